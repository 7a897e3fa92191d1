"""What `flywheel` says to a bad command line: the value it received and what it expected, never a traceback."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError
from typer.testing import CliRunner

from fleet.cli import app, with_received


def flywheel(args: list[str]) -> tuple[int, str]:
    """Exit code and output of ``flywheel ARGS``, the error box's frame and line breaks taken out."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "expected", "received"),
    [
        (["demo", "--turns", "0"], "greater than or equal to 1", "'0'"),
        (["demo", "--budget", "forty"], "a valid integer", "'forty'"),
        (["label", "bots", "--truth", __file__, "--box-jitter", "0.7"], "less than or equal to 0.5", "'0.7'"),
        (["agent", "run", "--max-frames", "-3"], "greater than or equal to 1", "'-3'"),
        (["hub", "rescore", "--batch", "4096"], "less than or equal to 1024", "'4096'"),
    ],
)
def test_a_bad_option_value_names_what_was_received_and_what_was_expected(args: list[str], expected: str,
                                                                           received: str) -> None:
    code, text = flywheel(args)
    assert code == 2, text
    assert f"Invalid value for '{args[-2]}'" in text and expected in text and f"received {received}" in text, text


def test_only_text_from_the_command_line_is_added_and_only_once() -> None:
    try:
        TypeAdapter(int).validate_python("x")
    except ValidationError as exc:
        cause = exc
    assert with_received("Input should be a valid integer", cause) == \
        "Input should be a valid integer; received 'x'"
    assert with_received("got 'x'; received 'x'", cause) == "got 'x'; received 'x'"
    assert with_received("no such file", None) == with_received("no such file", ValueError("x")) == "no such file"
    try:
        TypeAdapter(int).validate_python({"secret": "s3cr3t"})
    except ValidationError as exc:
        not_text = exc
    assert with_received("Input should be a valid integer", not_text) == "Input should be a valid integer"


@pytest.mark.parametrize("args", [["label", "bots", "--truth", "/nonexistent/truth.jsonl"],
                                  ["label", "sync", "--gold", "/nonexistent/gold.jsonl"]])
def test_a_missing_input_file_is_named_not_a_traceback(args: list[str]) -> None:
    code, text = flywheel(args)
    assert code == 2 and f"Invalid value for '{args[-2]}': file '{args[-1]}' does not exist" in text, text
