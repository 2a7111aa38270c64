import json
import subprocess
import sys

import libpipe.model


def test_public_names_are_reexports_of_private_modules():
    public = {n for n in dir(libpipe.model) if not n.startswith("_")}
    assert {"load_span", "load_client_head", "BlockSpan", "KVCachePool", "ModelConfig"} <= public
    for name in public:
        obj = getattr(libpipe.model, name)
        module = getattr(obj, "__module__", None)
        if module is not None:
            assert module.startswith("libpipe.model._"), (name, module)


def test_model_layer_does_not_import_networking_or_transformers():
    code = "import sys, json, libpipe.model; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "libpipe.model._span" in loaded
    forbidden = (
        "libpipe.net",
        "libpipe.wire",
        "libpipe.server",
        "libpipe.client",
        "trio",
        "transformers",
    )
    assert [m for m in loaded if m.split(".")[0] == "trio" or m.startswith(forbidden)] == []
