from __future__ import annotations

from pathlib import Path

import pytest

from fleet.edge.config import load_config
from fleet.errors import InvalidInput

MINIMAL = """
device_id = "cam-1"
[hub]
url = "http://hub.local:8000"
[source]
kind = "npz"
path = "frames.npz"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.device_id == "cam-1"
    assert cfg.runtime.threads == 1 and cfg.runtime.inference == "auto"
    assert cfg.source.path == tmp_path / "frames.npz"
    assert cfg.data_dir == tmp_path / "flywheel-agent"
    assert cfg.spool.max_bytes == 64 * 1024 * 1024
    assert cfg.triggers.default_spec is None
    assert (cfg.uplink.batch_max_cases, cfg.uplink.batch_max_bytes, cfg.uplink.linger_s) == (16, 4 * 1024 * 1024, 0.5)


def test_full_config(tmp_path: Path) -> None:
    text = MINIMAL + """
[runtime]
threads = 2
batch_size = 4
[spool]
max_bytes = 1000000
[uplink]
bytes_per_minute = 60000
backoff_base_s = 1
[heartbeat]
interval_s = 5
[ota]
poll_interval_s = 10
[triggers]
default_spec = "spec.json"
"""
    cfg = load_config(write(tmp_path, text.replace('device_id = "cam-1"', 'device_id = "cam-1"\ndata_dir = "/x/y"')))
    assert cfg.runtime.threads == 2 and cfg.runtime.batch_size == 4
    assert cfg.uplink.backoff_base_s == 1.0 and isinstance(cfg.uplink.backoff_base_s, float)
    assert cfg.data_dir == Path("/x/y")
    assert cfg.triggers.default_spec == tmp_path / "spec.json"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ('[runtime]\nthreads = 0\n', "runtime.threads must be in 1..64; received 0"),
        ('[runtime]\nthreads = "two"\n', "runtime.threads must be an integer; received 'two'"),
        ('[runtime]\nthredas = 2\n', "unknown key(s) ['thredas']"),
        ('[runtime]\ninference = "gpu"\n',
         "runtime.inference must be one of ['auto', 'process', 'thread']; received 'gpu'"),
        ('[spool]\nmax_bytes = 10\n', "spool.max_bytes must be >= 65536; received 10"),
        ('[uplink]\nbackoff_base_s = 5\nbackoff_max_s = 1\n', "backoff_max_s must be >= backoff_base_s"),
        ('[heartbeat]\ninterval_s = true\n', "heartbeat.interval_s must be a number; received True"),
        ('[uplink]\nbatch_max_cases = 0\n', "uplink.batch_max_cases must be in 1..64; received 0"),
        ('[uplink]\nlinger_s = -1\n', "uplink.linger_s must be in 0..60 seconds; received -1"),
        ('[uplink]\nbatch_max_bytes = 100\n', "uplink.batch_max_bytes must be >= 65536; received 100"),
    ],
)
def test_bad_values_are_refused_with_the_value(tmp_path: Path, patch: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        load_config(write(tmp_path, MINIMAL + patch))
    assert message in str(err.value)


def test_bad_source_kind_and_device_id(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"source.kind must be one of \['npz', 'folder', 'replay', 'video', "
                                           r"'stream', 'camera'\]; received 'usb'"):
        load_config(write(tmp_path, MINIMAL.replace('"npz"', '"usb"')))
    with pytest.raises(InvalidInput, match="device_id"):
        load_config(write(tmp_path, MINIMAL.replace("cam-1", "cam 1/../x")))
    with pytest.raises(InvalidInput, match="missing required key 'hub'"):
        load_config(write(tmp_path, 'device_id = "a"\n[source]\nkind = "npz"\npath = "x"\n'))
    with pytest.raises(InvalidInput, match="not valid TOML"):
        load_config(write(tmp_path, "device_id = "))
    with pytest.raises(InvalidInput, match="cannot read agent config"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(InvalidInput, match="hub.url must start with http"):
        load_config(write(tmp_path, MINIMAL.replace("http://hub.local:8000", "hub.local")))


@pytest.mark.parametrize("data_dir", ["taken", "taken/sub"])
def test_a_data_dir_at_or_under_a_file_is_refused_before_anything_runs(tmp_path: Path, data_dir: str) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(InvalidInput) as err:
        load_config(write(tmp_path, f'data_dir = "{data_dir}"\n' + MINIMAL))
    assert f"data_dir {tmp_path / data_dir} cannot be a folder: {tmp_path / 'taken'} is a file" in str(err.value)
    assert (tmp_path / "taken").read_text() == "a file"
