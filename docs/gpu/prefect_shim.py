"""Prefect is not installed on the lent GPU machine (a call carries 64 MiB): when it is missing,
its decorators become pass-throughs and the steps' plain functions run as inside the flow."""
import sys
import types

try:
    import prefect  # noqa: F401
except ImportError:
    print("prefect is not installed here: calling the steps' plain functions", file=sys.stderr, flush=True)
    shim = types.ModuleType("prefect")
    shim.task = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    shim.flow = shim.task
    shim.context = types.ModuleType("prefect.context")
    shim.context.TaskRunContext = object
    sys.modules["prefect"], sys.modules["prefect.context"] = shim, shim.context
