"""What `flywheel` says to a bad command line: the value it received and what it expected, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError
from typer.testing import CliRunner

from fleet.cli import app, with_received
from tests.support.asgi import free_port  # a loopback port no server listens on

_HUB_EXPORTS = ("FLYWHEEL_HUB_DATA_DIR", "FLYWHEEL_HUB_DATABASE_URL", "FLYWHEEL_HUB_DEV")


def flywheel(args: list[str]) -> tuple[int, str]:
    """Exit code and output of ``flywheel ARGS``, the error box's frame and line breaks taken out; the variables the
    hub commands export for their workers (their --data-dir, --database-url) are put back as they were."""
    before = {var: os.environ.get(var) for var in _HUB_EXPORTS}
    try:
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    finally:
        for var, value in before.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "expected", "received"),
    [
        (["demo", "--turns", "0"], "greater than or equal to 1", "'0'"),
        (["demo", "--budget", "forty"], "a valid integer", "'forty'"),
        (["label", "bots", "--truth", __file__, "--box-jitter", "0.7"], "less than or equal to 0.5", "'0.7'"),
        (["agent", "run", "--max-frames", "-3"], "greater than or equal to 1", "'-3'"),
        (["hub", "rescore", "--batch", "4096"], "less than or equal to 1024", "'4096'"),
        (["hub", "serve", "--port", "99999"], "less than or equal to 65535", "'99999'"),
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


def _hub_environment_restored(monkeypatch: pytest.MonkeyPatch, *more: str) -> None:
    """Unset the variables the hub commands export, and have the test's end put them back as they were."""
    for var in (*_HUB_EXPORTS, *more):
        monkeypatch.setenv(var, "")  # records the value before, which teardown restores
        monkeypatch.delenv(var)


@pytest.mark.parametrize("command", [["hub", "migrate"], ["hub", "token", "create", "--scope", "admin", "--name", "a"],
                                     ["hub", "enrollment-token", "cam-1"], ["hub", "serve", "--dev"]])
def test_a_hub_database_that_cannot_be_opened_is_named_not_a_traceback(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hub_environment_restored(monkeypatch)
    data = ["--data-dir", str(tmp_path / "data")]
    # a PostgreSQL server that is not running: its address, the password hidden
    url = f"postgresql+psycopg://flywheel:s3cr3t@127.0.0.1:{free_port()}/hub"
    code, text = flywheel([*command, *data, "--database-url", url])
    assert code == 2, text
    assert "error: cannot open the hub database at postgresql+psycopg://flywheel:***@127.0.0.1:" in text, text
    assert "OperationalError" in text and "s3cr3t" not in text and "Traceback" not in text, text
    # a data folder under a file: the SQLite file cannot be made, and nothing is
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, text = flywheel([*command, "--data-dir", str(blocker / "hub")])
    assert code == 2 and ("cannot open the hub database at sqlite:///" in text or
                          "cannot make the hub's data folder" in text) and "Not a directory" in text, text
    assert blocker.read_text() == "not a folder"
    # a URL of no kind the hub knows, and a malformed one
    code, text = flywheel([*command, *data, "--database-url", "mysql://db/hub"])
    assert code == 2 and "database_url must be sqlite or postgresql; received 'mysql'" in text, text
    code, text = flywheel([*command, *data, "--database-url", "not a url"])
    assert code == 2 and "error: FLYWHEEL_HUB_DATABASE_URL:" in text and "received 'not a url'" in text, text
    assert not (tmp_path / "data").exists()


def test_a_hub_setting_out_of_its_type_names_the_variable_and_the_value(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HUB_TOKEN_CACHE_TTL_S", "soon")
    code, text = flywheel(["hub", "migrate", "--data-dir", str(tmp_path / "data")])
    assert code == 2, text
    assert "error: FLYWHEEL_HUB_TOKEN_CACHE_TTL_S: Input should be a valid number" in text, text
    assert "received 'soon'" in text and not (tmp_path / "data").exists(), text


def test_an_s3_blob_store_that_cannot_be_reached_is_named_not_a_traceback(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` checks the bucket before it sets up a database; `sweep-blobs` and `rescore` name it too. A malformed
    endpoint names the variable and the value."""
    _hub_environment_restored(monkeypatch)
    data = ["--data-dir", str(tmp_path / "data")]
    for var, value in {"FLYWHEEL_HUB_BLOB_STORE": "s3", "FLYWHEEL_HUB_S3_BUCKET": "frames",
                       "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}.items():
        monkeypatch.setenv(var, value)
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FLYWHEEL_HUB_S3_ENDPOINT_URL", down)
    code, text = flywheel(["hub", "serve", "--dev", *data])
    assert code == 2 and f"error: cannot open the hub's blob store s3://frames/blobs/ at {down}" in text, text
    assert "the S3 bucket 'frames' cannot be reached (EndpointConnectionError)" in text, text
    assert "Traceback" not in text and not (tmp_path / "data").exists(), text
    assert flywheel(["hub", "migrate", *data])[0] == 0  # a hub whose bucket has gone away since
    for command in (["hub", "sweep-blobs"], ["hub", "rescore", "--version", "m1"]):
        code, text = flywheel([*command, *data])
        assert code == 2 and "the S3 bucket 'frames' cannot be reached" in text and "Traceback" not in text, text
    monkeypatch.setenv("FLYWHEEL_HUB_S3_ENDPOINT_URL", "127.0.0.1:9000")
    code, text = flywheel(["hub", "serve", "--dev", "--data-dir", str(tmp_path / "other")])
    assert code == 2 and "FLYWHEEL_HUB_S3_ENDPOINT_URL: s3_endpoint_url must be an http:// or https:// URL" in text
    assert "received '127.0.0.1:9000'" in text and not (tmp_path / "other").exists(), text


def test_a_token_made_where_no_hub_was_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator may make tokens before the hub's first start, so a new database is set up; a note says so, or a
    misdirected --data-dir would show only later, as a token the real hub does not know."""
    _hub_environment_restored(monkeypatch)
    data = ["--data-dir", str(tmp_path / "hub")]
    result = CliRunner().invoke(app, ["hub", "token", "create", "--scope", "trainer", "--name", "gpu", *data])
    assert result.exit_code == 0, result.output
    assert "note: no hub database was at sqlite:///" in result.stderr, result.stderr
    assert "made the trainer token 'gpu' in it" in result.stderr and result.stdout.startswith("fwt_"), result.output
    again = CliRunner().invoke(app, ["hub", "enrollment-token", "cam-1", *data])
    assert again.exit_code == 0 and "note:" not in again.stderr, again.output  # the hub is there now


def test_a_labeling_ledger_that_cannot_be_opened_is_named_not_a_traceback(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.errors import InvalidInput
    from labeling import ledger

    junk = tmp_path / "notes.sqlite"
    junk.write_text("not a database")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    sync = ["label", "sync", "--hub-token", "h", "--ls-token", "l"]
    for args, state, why in [(["label", "status"], junk, "file is not a database"), (sync, junk, "not a database"),
                             (["label", "status"], tmp_path, "unable to open database file"),
                             (sync, tmp_path, "unable to open database file"),
                             (sync, blocker / "ledger.sqlite", "File exists")]:
        code, text = flywheel([*args, "--state", str(state)])
        assert code == 2, text
        assert f"error: cannot open the labeling ledger at {state}: " in text and why in text, text
        assert "check --state" in text, text
    assert junk.read_text() == "not a database" and blocker.read_text() == "x"
    # a new ledger whose schema cannot be set up leaves no file behind
    monkeypatch.setattr(ledger, "SCHEMA", "CREATE TABLE broken (")
    with pytest.raises(InvalidInput, match="cannot open the labeling ledger at .*new.sqlite: incomplete input"):
        ledger.Ledger(tmp_path / "new.sqlite")
    assert not list(tmp_path.glob("new.sqlite*"))


def test_label_bots_says_in_a_line_that_label_studio_cannot_be_reached(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.retry import RetryPolicy
    from labeling import studio

    monkeypatch.setattr(studio, "RetryPolicy", lambda: RetryPolicy(attempts=2, deadline_s=1.0))  # fewer waits
    truth = tmp_path / "truth.jsonl"
    truth.write_text('{"case_id": "c1", "label": 1}\n')
    url = f"http://127.0.0.1:{free_port()}"
    code, text = flywheel(["label", "bots", "--truth", str(truth), "--ls-url", url, "--ls-token", "t"])
    assert code == 1, text
    assert "error: Label Studio list projects: ConnectError" in text and "Traceback" not in text, text


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_demo_seed_out_of_range_is_refused_before_the_workspace_is_made(seed: str, tmp_path: Path) -> None:
    """The trainer seeds each epoch with seed * 100003 + ... in torch's int64: a seed past 32 bits failed in the
    base model's first epoch, a negative one when the world was drawn."""
    code, text = flywheel(["demo", "--labeler", "oracle", "--workspace", str(tmp_path / "ws"), "--seed", seed])
    assert code == 2 and "--seed must be an integer in [0, 2**32)" in text and f"received {seed}" in text, text
    assert not (tmp_path / "ws").exists()
