"""How the command turns a stop signal into exit 130, in-process (the end-to-end kills are in
test_runtime_reliability.py): the interrupt a SIGTERM handler raises, and the errors an
interrupt turns into when it lands inside library code at start-up."""

from __future__ import annotations

import signal

import pytest

import dvl_batch.cli as cli
import dvl_batch.cli_signals as cli_signals
from dvl_batch.errors import EXIT_INTERRUPTED, StopNow, UsageError, caused_by_stop


def _raised(make):
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the test inspects what came out
        return exc
    raise AssertionError("nothing was raised")


def _interrupt_inside_class_body():
    """An interrupt raised in a descriptor's __set_name__ (a dataclass field during an import):
    CPython 3.11 turns it into a RuntimeError caused by the interrupt (later versions pass it on)."""

    class Field:
        def __set_name__(self, owner, name):
            raise StopNow

    type("Category", (), {"by_key": Field()})


def test_the_stop_signal_raises_a_subclass_of_keyboard_interrupt_not_the_class_itself():
    stop = _raised(lambda: cli_signals.terminate_as_interrupt(signal.SIGTERM, None))
    assert isinstance(stop, KeyboardInterrupt) and type(stop) is not KeyboardInterrupt


def test_errors_caused_by_an_interrupt_count_as_one_and_others_do_not():
    wrapped = _raised(_interrupt_inside_class_body)
    assert caused_by_stop(wrapped)
    assert caused_by_stop(StopNow()) and caused_by_stop(KeyboardInterrupt())

    def while_handling():
        try:
            raise StopNow
        except StopNow:
            raise OSError("disk full while saving after Ctrl-C")  # noqa: B904 - the context is the point

    assert caused_by_stop(_raised(while_handling))

    def hidden():
        try:
            raise StopNow
        except StopNow:
            raise UsageError("decided on its own") from None

    assert not caused_by_stop(_raised(hidden))
    assert not caused_by_stop(ValueError("a bug")) and not caused_by_stop(SystemExit(130))


@pytest.mark.parametrize("fault", [_interrupt_inside_class_body, lambda: (_ for _ in ()).throw(StopNow())])
def test_an_interrupt_at_start_up_exits_130_with_one_line_and_no_traceback(monkeypatch, capsys, fault):
    monkeypatch.setattr(cli, "app", fault)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli()
    finally:
        signal.signal(signal.SIGTERM, previous[0]), signal.signal(signal.SIGINT, previous[1])
    assert exit_info.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        "aborted: parts already written are complete; rerun to resume"
    ]


def test_an_unrelated_error_at_start_up_is_not_called_an_interrupt(monkeypatch):
    def bug():
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "app", bug)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(ValueError, match="a bug"):
            cli.run_cli()
    finally:
        signal.signal(signal.SIGTERM, previous[0]), signal.signal(signal.SIGINT, previous[1])
