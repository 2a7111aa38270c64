"""`info` and `ping` answer exactly what proto/RPC.md promises."""

from __future__ import annotations

import re
from pathlib import Path

from libpipe.model import ModelConfig
from libpipe.wire import PROTOCOL_VERSION

from .conftest import running_servers

RPC_MD = Path(__file__).parents[2] / "proto" / "RPC.md"
TYPES = {"str": str, "int": int, "float": float, "[int, int]": list, "[str]": list}


def contract() -> dict[str, type]:
    """The rows of the `info` table in proto/RPC.md: key -> Python type."""
    text = RPC_MD.read_text()
    table = text[text.index("## `info`") : text.index("## `ping`")]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, re.MULTILINE)
    return {key: TYPES[kind] for key, kind in rows}


async def test_info_carries_every_key_of_the_contract(gqa, make_config):
    config = make_config(gqa, (2, 6), cache_bytes=1 << 20, max_length=1024)
    async with running_servers([config]) as (servers, pool):
        conn = await pool.get(servers[0].address)
        info = (await conn.call("info")).meta
        assert (await conn.call("ping")).meta == {}
    keys = contract()
    assert len(keys) == 18
    assert set(info) == set(keys)
    for key, kind in keys.items():
        assert isinstance(info[key], kind), key
    model = ModelConfig.from_file(gqa)
    assert info["peer_id"] == servers[0].peer_id
    assert info["model_id"] == model.model_id
    assert info["protocol"] == PROTOCOL_VERSION
    assert info["span"] == [2, 6] and info["num_blocks"] == 8
    assert (info["dtype"], info["wire_dtype"], info["device"]) == ("float32", "float16", "cpu")
    assert info["state"] == "online"
    assert info["max_length"] == 1024
    assert info["cache_bytes_total"] == info["cache_bytes_free"] == 1 << 20
    # 4 blocks x (K and V) x 2 kv heads x head_dim 16 x 4 bytes
    assert info["cache_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
    assert info["active_sessions"] == 0 and info["adapters"] == []
