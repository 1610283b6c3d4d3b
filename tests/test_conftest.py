"""The test harness's own shortcut (tests/conftest.py): frames of pseudo-files are looked up
without stdlib's scan of ``sys.modules``, with stdlib's answers."""

import inspect
import sys


def test_frame_module_gives_stdlib_answers():
    fast = inspect.getmodule
    assert fast.__name__ == "_frame_module"  # installed by conftest's pytest_configure
    stdlib = fast.__defaults__[-1]
    assert stdlib is not fast and stdlib.__module__ == "inspect"
    frames: list = []
    exec(compile("import sys\nframes.append(sys._getframe())", "<string>", "exec"), {"frames": frames})
    frames.append(sys._getframe())
    for frame in frames:
        name = frame.f_code.co_filename
        assert fast(frame, name) is stdlib(frame, name)
        assert fast(frame.f_code, name) is stdlib(frame.f_code, name)
    assert fast(frames[0], "<string>") is None and fast(frames[1], __file__) is stdlib(frames[1], __file__)
    assert fast(test_frame_module_gives_stdlib_answers) is sys.modules[__name__]
    assert inspect.getframeinfo(frames[0]).filename == "<string>"  # what TVMScript's inspect.stack() reads
    here = inspect.getframeinfo(sys._getframe())
    assert here.code_context == ["    here = inspect.getframeinfo(sys._getframe())\n"]
