# The Python side of eval's execution check (server/src/eval/exec.rs runs it
# with `python3 -I -S`, in a temporary folder, under a timeout).
#
#   doctests.py trace FILE MODULE PACKAGE OUT
#                          which doctests of FILE pass, and which of FILE's
#                          lines each one runs
#   doctests.py run FILE MODULE PACKAGE OUT NAME...
#                          run the named doctests of FILE; exit 0 only if
#                          every one was found and passed
#
# FILE is loaded as the module MODULE (its dotted name, so that relative
# imports resolve in its package) in place of any copy already imported; a
# package's `__init__.py` finds its submodules in the folder PACKAGE (its
# original folder: FILE may be a modified copy elsewhere; "" otherwise). The
# doctests are the ones `doctest.DocTestFinder` finds in it. Answers are JSON
# written to OUT (a file, not a pipe: the caller polls for the timeout).
import doctest
import importlib.util
import json
import os
import resource
import signal
import sys

# Suggestions are untrusted code: bounded memory, file size and time per test.
GIB = 1 << 30
resource.setrlimit(resource.RLIMIT_AS, (4 * GIB, 4 * GIB))
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
TEST_SECONDS = 5


class Timeout(BaseException):
    pass


def on_alarm(signum, frame):
    raise Timeout()


def load(path, module, package):
    where = [package] if package else None
    spec = importlib.util.spec_from_file_location(module, path, submodule_search_locations=where)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


def run_test(test, trace=None):
    """(passed, lines run in the module's file) of one doctest."""
    lines = set()
    path = os.path.realpath(test.filename) if test.filename else None

    def local(frame, event, arg):
        if event == "line":
            lines.add(frame.f_lineno)
        return local

    def tracer(frame, event, arg):
        if os.path.realpath(frame.f_code.co_filename) == path:
            lines.add(frame.f_lineno)
            return local
        return None

    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_SECONDS)
    try:
        if trace and path:
            sys.settrace(tracer)
        result = runner.run(test, out=lambda s: None, clear_globs=True)
        ok = result.failed == 0 and result.attempted > 0
    except Timeout:
        ok = False
    finally:
        sys.settrace(None)
        signal.alarm(0)
    return ok, lines


def main():
    mode, path, module, package, out = sys.argv[1:6]
    names = sys.argv[6:]
    answer = {}
    try:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(TEST_SECONDS)
        try:
            mod = load(path, module, package)
        finally:
            signal.alarm(0)
        tests = [t for t in doctest.DocTestFinder().find(mod, module) if t.examples]
    except BaseException as e:  # the module does not load: syntax error, import error, timeout
        answer = {"error": f"{type(e).__name__}: {e}"[:300]}
        tests = None
    if tests is not None and mode == "trace":
        answer["tests"] = []
        for t in tests:
            ok, lines = run_test(t, trace=True)
            answer["tests"].append({"name": t.name, "ok": ok, "lines": sorted(lines)})
    elif tests is not None:
        by_name = {t.name: t for t in tests}
        missing = [n for n in names if n not in by_name]
        failed = [n for n in names if n in by_name and not run_test(by_name[n])[0]]
        answer = {"missing": missing, "failed": failed}
    # Written before exiting: module code may have left threads behind.
    with open(out, "w") as f:
        json.dump(answer, f)
    passed = tests is not None and mode == "run" and not answer["missing"] and not answer["failed"]
    sys.stdout.flush()
    os._exit(0 if passed or mode == "trace" and tests is not None else 1)


main()
