"""The package surface: what `import libpipe` offers, and nothing private."""

import libpipe


def test_public_names_are_reexports_only():
    public = {n for n in dir(libpipe) if not n.startswith("_")}
    modules = {
        "errors",
        "wire",
        "net",
        "model",
        "server",
        "client",
        "swarm",
        "placement",
        "sim",
        "cli",
        "monitor",
    }
    for name in public - modules:
        obj = getattr(libpipe, name)
        assert getattr(obj, "__module__", "libpipe").startswith("libpipe"), name


def test_errors_are_exported():
    for name in ("LibpipeError", "NoRouteError", "CacheFullError", "ProtocolError"):
        assert issubclass(getattr(libpipe, name), libpipe.LibpipeError)


def test_client_classes_are_exported_without_importing_torch_eagerly():
    assert libpipe.Client.__name__ == "Client"
    assert libpipe.SyncClient.__name__ == "SyncClient"
