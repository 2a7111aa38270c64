"""The client's generation API without servers: defaults and arguments."""

from __future__ import annotations

import libpipe

NOWHERE = ["127.0.0.1:9"]


def test_stop_tokens_default_to_the_checkpoint_eos(model_dir):
    client = libpipe.Client(model_dir, NOWHERE, insecure=True)
    assert client.stop_tokens == client.config.eos_token_ids == {2}
