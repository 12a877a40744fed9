"""One lock for building Python syntax trees (``ast.parse``, ``ast.literal_eval`` of a string,
``np.load``, which reads each array's header with ``literal_eval``) from more than one thread.

CPython 3.11 keeps the AST constructor's recursion counter per interpreter, not per thread
(python/cpython#106905): a thread switch inside one parse (a garbage collection that runs a
finaliser is enough) makes another thread's parse raise ``SystemError: AST constructor recursion
depth mismatch``. A server and its clients share one process in tests and wherever an application
runs clients as threads; a client died of it in CI while reading its data file. atoll's own parses
hold ``PARSE`` (tests/core/test_threaded_parse.py)."""
import threading

PARSE = threading.Lock()
