"""pool.config: file + env loading, every kind of problem, and model path confinement."""

from __future__ import annotations

import dataclasses
import os
import pickle
import tomllib
from pathlib import Path

import pytest
import zmq.auth

from pool.config import (
    Config,
    ConfigError,
    ModelConfig,
    PathNotAllowed,
    PoolConfig,
    check_config,
    check_model_path,
    default_control_endpoint,
    default_state_dir,
    effective_model_roots,
    ipc_path,
    load_config,
)
from pool.config_checks import is_loopback_host
from pool.config_fields import MODEL_SPECS, POOL_SPECS, validate

# Short, fixed home and runtime dirs keep every derived ipc path well under 107 bytes
# and make the tests independent of the real environment.
ENV = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}
CONTROL = "ipc:///run/user/1000/gpu-pool/control.sock"


def write(tmp_path: Path, text: str, name: str = "pool.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def model_file(tmp_path: Path, rel: str = "models/m.pt") -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really torchscript")
    return path


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ENV if env is None else env)
    assert info.value.problems == check_config(str(path), ENV if env is None else env)
    return info.value.problems


@pytest.fixture
def curve(tmp_path: Path) -> tuple[str, str]:
    """A real zmq.auth server secret key and a directory holding one client public key."""
    keys = tmp_path / "keys"
    authorized = tmp_path / "authorized"
    keys.mkdir()
    authorized.mkdir()
    _, secret = zmq.auth.create_certificates(str(keys), "server")
    zmq.auth.create_certificates(str(authorized), "client")
    return secret, str(authorized)


# ---------------------------------------------------------------------------- defaults


def test_defaults_without_a_file() -> None:
    config = load_config(None, ENV)
    assert config.source is None
    assert config.models == ()
    pool = config.pool
    assert pool.state_dir == "/home/u/.local/state/gpu-pool"
    assert pool.control == CONTROL
    assert pool.frontend == "tcp://127.0.0.1:5555"
    assert pool.metrics == "127.0.0.1:9400"
    assert pool.model_roots == ()
    assert (pool.heartbeat_timeout_s, pool.surge_margin_mb, pool.log_level) == (5.0, 512, "INFO")
    assert (pool.curve_secret_key, pool.curve_authorized_keys) == (None, None)


def test_default_state_dir_follows_xdg_state_home() -> None:
    assert default_state_dir({"HOME": "/h", "XDG_STATE_HOME": "/xs"}) == "/xs/gpu-pool"
    # The XDG spec says relative values are to be ignored.
    assert default_state_dir({"HOME": "/h", "XDG_STATE_HOME": "rel"}) == "/h/.local/state/gpu-pool"
    assert default_state_dir({"HOME": "/h"}) == "/h/.local/state/gpu-pool"


def test_default_control_endpoint_order() -> None:
    assert default_control_endpoint("/s", {"XDG_RUNTIME_DIR": "/r"}) == (
        "ipc:///r/gpu-pool/control.sock"
    )
    assert default_control_endpoint("/s", {"XDG_RUNTIME_DIR": ""}) == "ipc:///s/control.sock"
    assert default_control_endpoint(None, {"HOME": "/h"}) == (
        "ipc:///h/.local/state/gpu-pool/control.sock"
    )
    # pool-ctl calls this with no state_dir: it must find a daemon moved by env.
    assert default_control_endpoint(None, {"GPU_POOL_STATE_DIR": "/st"}) == (
        "ipc:///st/control.sock"
    )
    env = {"GPU_POOL_CONTROL": "tcp://127.0.0.1:7000", "XDG_RUNTIME_DIR": "/r"}
    assert default_control_endpoint("/s", env) == "tcp://127.0.0.1:7000"


def test_pool_config_constructed_directly_derives_control_from_its_state_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("GPU_POOL_CONTROL", raising=False)
    assert PoolConfig(state_dir="/srv/st").control == "ipc:///srv/st/control.sock"


def test_without_runtime_dir_control_follows_state_dir_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[pool]\nstate_dir = "st"\n')
    config = load_config(str(path), {"HOME": "/home/u"})
    assert config.pool.state_dir == str(tmp_path / "st")
    assert config.pool.control == f"ipc://{tmp_path / 'st'}/control.sock"


def test_specs_cover_every_dataclass_field_and_the_defaults_are_valid() -> None:
    for cls, specs in ((PoolConfig, POOL_SPECS), (ModelConfig, MODEL_SPECS)):
        names = [f.name for f in dataclasses.fields(cls)]
        assert sorted(specs) == sorted(names)
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING or f.name in ("control", "model_roots"):
                continue  # no default, or "" / () meaning "derive it"
            found: list[str] = []
            assert validate(f.name, specs[f.name], f.default, found, env=False), found


# -------------------------------------------------------------------- a full file


def test_full_file_round_trip(tmp_path: Path, curve: tuple[str, str]) -> None:
    secret, authorized = curve
    first = model_file(tmp_path, "roots/a/1/model.pt")
    second = model_file(tmp_path, "roots/b/model.pt2")
    path = write(
        tmp_path,
        f"""
[pool]
frontend = "tcp://0.0.0.0:6000"
control = "ipc://{tmp_path}/c.sock"
state_dir = "{tmp_path}/state"
metrics = ""
model_roots = ["{tmp_path}/roots"]
boot_timeout_s = 60
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 5.5
request_grace_s = 0
drain_timeout_s = 12
upgrade_timeout_s = 300
stop_timeout_s = 3
surge_margin_mb = 0
curve_secret_key = "{secret}"
curve_authorized_keys = "{authorized}"
log_format = "json"
log_level = "debug"

[[models]]
name = "resnet"
path = "{first}"
version = "3"
devices = ["cuda:0", "cuda:1", "cuda:1"]
max_batch = 32
max_delay_ms = 0
max_queue = 10
request_timeout_s = 2.5
retry_on_worker_loss = false
max_requests = 1000
max_requests_jitter = 0
max_rss_mb = 4096
max_gpu_growth_mb = 256
threads = 4

[[models]]
name = "tiny.v2_x-1"
path = "{second}"
""",
    )
    config = load_config(str(path), ENV)
    assert config == Config(
        pool=PoolConfig(
            frontend="tcp://0.0.0.0:6000",
            control=f"ipc://{tmp_path}/c.sock",
            state_dir=f"{tmp_path}/state",
            metrics="",
            model_roots=(f"{tmp_path}/roots",),
            boot_timeout_s=60.0,
            heartbeat_interval_s=0.5,
            heartbeat_timeout_s=5.5,
            request_grace_s=0.0,
            drain_timeout_s=12.0,
            upgrade_timeout_s=300.0,
            stop_timeout_s=3.0,
            surge_margin_mb=0,
            curve_secret_key=secret,
            curve_authorized_keys=authorized,
            log_format="json",
            log_level="DEBUG",
        ),
        models=(
            ModelConfig(
                name="resnet",
                path=str(first),
                version="3",
                devices=("cuda:0", "cuda:1", "cuda:1"),
                max_batch=32,
                max_delay_ms=0.0,
                max_queue=10,
                request_timeout_s=2.5,
                retry_on_worker_loss=False,
                max_requests=1000,
                max_requests_jitter=0.0,
                max_rss_mb=4096,
                max_gpu_growth_mb=256,
                threads=4,
            ),
            ModelConfig(name="tiny.v2_x-1", path=str(second)),
        ),
        source=str(path),
    )
    assert isinstance(config.pool.boot_timeout_s, float)  # an int in TOML becomes a float
    assert effective_model_roots(config) == (f"{tmp_path}/roots",)


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    model = model_file(conf_dir, "models/m.pt")
    (conf_dir / "roots").mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # must not matter
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(
        conf_dir,
        '[pool]\nstate_dir = "~/st"\nmodel_roots = ["models", "roots/../roots"]\n'
        '[[models]]\nname = "m"\npath = "models/./m.pt"\n',
    )
    config = load_config(os.path.relpath(path, elsewhere), ENV)
    assert config.source == str(path)
    assert config.models[0].path == str(model)
    assert config.pool.model_roots == (str(conf_dir / "models"), str(conf_dir / "roots"))
    assert config.pool.state_dir == str(tmp_path / "home" / "st")


def test_effective_model_roots_default_to_the_model_dirs_and_the_demo_dir(
    tmp_path: Path,
) -> None:
    a = model_file(tmp_path, "a/m.pt")
    b = model_file(tmp_path, "a/n.pt")
    c = model_file(tmp_path, "c/m.pt")
    path = write(
        tmp_path,
        f'[pool]\nstate_dir = "/st"\n'
        f'[[models]]\nname = "a"\npath = "{a}"\n[[models]]\nname = "b"\npath = "{b}"\n'
        f'[[models]]\nname = "c"\npath = "{c}"\n',
    )
    roots = effective_model_roots(load_config(str(path), ENV))
    assert roots == (str(tmp_path / "a"), str(tmp_path / "c"), "/st/demo")


# ------------------------------------------------------------------------- problems

BAD_POOL = [
    ('frontnd = "tcp://127.0.0.1:1"', "pool.frontnd: unknown key (did you mean 'frontend'?)"),
    ("zzzz = 1", "pool.zzzz: unknown key"),
    ('frontend = "inproc://x"', "pool.frontend: inproc:// is only reachable inside the daemon"),
    ('frontend = "http://127.0.0.1:80"', "pool.frontend: must start with tcp:// or ipc://"),
    ('frontend = "tcp://127.0.0.1"', "pool.frontend: must be tcp://HOST:PORT"),
    ('frontend = "tcp://127.0.0.1:70000"', "pool.frontend: port must be 1..65535 or *"),
    ('control = "tcp://127.0.0.1:0"', "pool.control: port must be 1..65535 or *"),
    ('control = "ipc://"', "pool.control: ipc:// endpoint needs a path"),
    ("frontend = 5555", "pool.frontend: must be a tcp:// or ipc:// endpoint (got 5555)"),
    (
        'metrics = "9400"',
        "pool.metrics: must be \"\" or HOST:PORT with a port 0..65535 (0: any free port) "
        "(got '9400')",
    ),
    ('metrics = "127.0.0.1:65536"', 'pool.metrics: must be "" or HOST:PORT'),
    ("boot_timeout_s = 0", "pool.boot_timeout_s: must be a number > 0 (got 0.0)"),
    ("boot_timeout_s = inf", "pool.boot_timeout_s: must be a number > 0 (got inf)"),
    ("boot_timeout_s = nan", "pool.boot_timeout_s: must be a number > 0 (got nan)"),
    ('drain_timeout_s = "30"', "pool.drain_timeout_s: must be a number > 0 (got '30')"),
    ("stop_timeout_s = true", "pool.stop_timeout_s: must be a number > 0 (got true)"),
    ("request_grace_s = -1", "pool.request_grace_s: must be a number >= 0 (got -1.0)"),
    ("surge_margin_mb = 1.5", "pool.surge_margin_mb: must be an integer >= 0 (got 1.5)"),
    ("surge_margin_mb = -1", "pool.surge_margin_mb: must be an integer >= 0 (got -1)"),
    ('log_format = "xml"', 'pool.log_format: must be "text" or "json" (got \'xml\')'),
    ('log_level = "LOUD"', "pool.log_level: must be a logging level ("),
    ("model_roots = []", "pool.model_roots: must be a non-empty list (leave the key out"),
    ('model_roots = "/srv"', "pool.model_roots: must be a non-empty list"),
    ('model_roots = ["/no/such/dir"]', "pool.model_roots[0]: no such directory /no/such/dir"),
    ('state_dir = ""', "pool.state_dir: must be a non-empty path (got '')"),
    ('curve_secret_key = "/no/key"', "pool.curve_secret_key: no such file /no/key"),
    (
        "heartbeat_interval_s = 5",
        "pool.heartbeat_timeout_s: must be greater than pool.heartbeat_interval_s "
        "(got 5.0 <= 5.0)",
    ),
    (
        'frontend = "tcp://127.0.0.1:7"\ncontrol = "tcp://127.0.0.1:7"',
        "pool.control: must differ from pool.frontend",
    ),
]


@pytest.mark.parametrize(("snippet", "expected"), BAD_POOL)
def test_pool_problem_is_reported_with_its_key(tmp_path: Path, snippet: str, expected: str) -> None:
    problems = problems_of(write(tmp_path, f"[pool]\n{snippet}\n"))
    assert any(p.startswith(expected) for p in problems), problems


BAD_MODEL = [
    ("max_bach = 3", "models[0].max_bach: unknown key (did you mean 'max_batch'?)"),
    ("max_batch = 0", "models[0].max_batch: must be an integer >= 1 (got 0)"),
    ("max_batch = true", "models[0].max_batch: must be an integer >= 1 (got true)"),
    ("max_batch = 2.0", "models[0].max_batch: must be an integer >= 1 (got 2.0)"),
    ("max_delay_ms = -0.5", "models[0].max_delay_ms: must be a number >= 0 (got -0.5)"),
    ("max_queue = 0", "models[0].max_queue: must be an integer >= 1 (got 0)"),
    ("request_timeout_s = 0", "models[0].request_timeout_s: must be a number > 0 (got 0.0)"),
    ("retry_on_worker_loss = 1", "models[0].retry_on_worker_loss: must be true or false (got 1)"),
    ("max_requests = -1", "models[0].max_requests: must be an integer >= 0 (got -1)"),
    ("max_requests_jitter = 1.5", "models[0].max_requests_jitter: must be a number between 0"),
    ("max_rss_mb = -5", "models[0].max_rss_mb: must be an integer >= 0 (got -5)"),
    ("max_gpu_growth_mb = -5", "models[0].max_gpu_growth_mb: must be an integer >= 0 (got -5)"),
    ("threads = 0", "models[0].threads: must be an integer >= 1 (got 0)"),
    ("version = 3", 'models[0].version: must be a string such as "3" (got 3)'),
    ('version = "a/b"', "models[0].version: must be 1-128 letters"),
    ('devices = ["gpu0"]', 'models[0].devices[0]: must be "cpu" or "cuda:N" with N >= 0'),
    ('devices = ["cpu", "cuda:-1"]', 'models[0].devices[1]: must be "cpu" or "cuda:N"'),
    ('devices = ["cuda"]', 'models[0].devices[0]: must be "cpu" or "cuda:N"'),
    ("devices = []", "models[0].devices: must be a non-empty list (leave the key out"),
    ('devices = "cpu"', "models[0].devices: must be a non-empty list"),
]


@pytest.mark.parametrize(("snippet", "expected"), BAD_MODEL)
def test_model_problem_is_reported_with_its_key(
    tmp_path: Path, snippet: str, expected: str
) -> None:
    model = model_file(tmp_path)
    path = write(tmp_path, f'[[models]]\nname = "m"\npath = "{model}"\n{snippet}\n')
    problems = problems_of(path)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\nx = 1\n", "model: unknown top-level key (did you mean 'models'?)"),
        ("pool = 3\n", "pool: must be a table (got 3)"),
        ("[models]\nname = 'm'\n", "models: must be an array of tables ([[models]])"),
        ("models = [1]\n", "models[0]: must be a table (got 1)"),
        ("[[models]]\npath = '/x'\n", "models[0].name: required"),
        ("[[models]]\nname = 'm'\n", "models[0].path: required"),
        ("[[models]]\nname = 'm'\npath = '/no/y.pt'\n", "models[0].path: no such file /no/y.pt"),
        ("[[models]]\nname = 'a b'\npath = '/x'\n", "models[0].name: must be 1-64 letters"),
        ("[[models]]\nname = '-a'\npath = '/x'\n", "models[0].name: must be 1-64 letters"),
        (f"[[models]]\nname = '{'a' * 65}'\npath = '/x'\n", "models[0].name: must be 1-64"),
    ],
)
def test_structural_problems(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(write(tmp_path, text))
    assert any(p.startswith(expected) for p in problems), problems


def test_model_path_that_is_a_directory(tmp_path: Path) -> None:
    path = write(tmp_path, f'[[models]]\nname = "m"\npath = "{tmp_path}"\n')
    assert problems_of(path) == [f"models[0].path: not a regular file {tmp_path}"]


def test_model_roots_entry_that_is_a_file(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    path = write(tmp_path, f'[pool]\nmodel_roots = ["{tmp_path}", "{model}"]\n')
    assert problems_of(path) == [f"pool.model_roots[1]: not a directory {model}"]


def test_duplicate_model_names(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    entry = f'[[models]]\nname = "m"\npath = "{model}"\n'
    other = f'[[models]]\nname = "n"\npath = "{model}"\n'
    problems = problems_of(write(tmp_path, entry + other + entry))
    assert problems == ["models[2].name: duplicate model name 'm' (also models[0])"]


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    path = write(
        tmp_path,
        '[pool]\nlog_format = "xml"\nfrontnd = "x"\n'
        f'[[models]]\nname = "m"\npath = "{model}"\nmax_batch = 0\n'
        '[[models]]\nname = "n"\npath = "/no/such.pt"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ENV)
    # Type and key problems come first, then content checks, each in file order.
    assert info.value.problems == [
        "pool.frontnd: unknown key (did you mean 'frontend'?)",
        'pool.log_format: must be "text" or "json" (got \'xml\')',
        "models[0].max_batch: must be an integer >= 1 (got 0)",
        "models[1].path: no such file /no/such.pt",
    ]
    message = str(info.value)
    assert message.startswith(f"invalid configuration in {path} (4 problems):")
    assert all(p in message for p in info.value.problems)


def test_config_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["a: b", "c: d"], "/f.toml")))
    assert (error.problems, error.source) == (["a: b", "c: d"], "/f.toml")
    assert str(error) == "invalid configuration in /f.toml (2 problems):\n  a: b\n  c: d"


def test_model_outside_explicit_model_roots(tmp_path: Path) -> None:
    (tmp_path / "roots").mkdir()
    inside = model_file(tmp_path, "roots/in.pt")
    outside = model_file(tmp_path, "elsewhere/out.pt")
    path = write(
        tmp_path,
        f'[pool]\nmodel_roots = ["{tmp_path}/roots"]\n'
        f'[[models]]\nname = "in"\npath = "{inside}"\n'
        f'[[models]]\nname = "out"\npath = "{outside}"\n',
    )
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"models[1].path: {outside} is outside the allowed model roots")


# ------------------------------------------------------------------ environment


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    roots = [tmp_path / "r1", tmp_path / "r2"]
    for root in roots:
        root.mkdir()
    path = write(
        tmp_path,
        '[pool]\nfrontend = "tcp://127.0.0.1:1111"\nheartbeat_timeout_s = 9\n'
        'model_roots = ["/no/such/root"]\nlog_level = "ERROR"\n',
    )
    env = ENV | {
        "GPU_POOL_FRONTEND": "ipc:///tmp/f.sock",
        "GPU_POOL_HEARTBEAT_TIMEOUT_S": "12.5",
        "GPU_POOL_SURGE_MARGIN_MB": " 64 ",
        # The file's missing root is not reported: env replaces it.
        "GPU_POOL_MODEL_ROOTS": f"{roots[0]}::{roots[1]}:",
        "GPU_POOL_LOG_LEVEL": "debug",
        "GPU_POOL_METRICS": "",
        "GPU_POOL_UNRELATED_THING": "ignored",
    }
    pool = load_config(str(path), env).pool
    assert pool.frontend == "ipc:///tmp/f.sock"
    assert pool.heartbeat_timeout_s == 12.5
    assert pool.surge_margin_mb == 64
    assert pool.model_roots == (str(roots[0]), str(roots[1]))
    assert pool.log_level == "DEBUG"
    assert pool.metrics == ""


def test_env_state_dir_moves_the_default_control(tmp_path: Path) -> None:
    env = {"HOME": "/home/u", "GPU_POOL_STATE_DIR": str(tmp_path / "st")}
    pool = load_config(None, env).pool
    assert pool.state_dir == str(tmp_path / "st")
    assert pool.control == f"ipc://{tmp_path / 'st'}/control.sock"


def test_env_control_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[pool]\ncontrol = "ipc:///tmp/file.sock"\n')
    env = ENV | {"GPU_POOL_CONTROL": "ipc:///tmp/env.sock"}
    assert load_config(str(path), env).pool.control == "ipc:///tmp/env.sock"


def test_empty_env_values_switch_optional_settings_off(
    tmp_path: Path, curve: tuple[str, str]
) -> None:
    secret, authorized = curve
    path = write(
        tmp_path,
        f'[pool]\nmodel_roots = ["{tmp_path}"]\ncurve_secret_key = "{secret}"\n'
        f'curve_authorized_keys = "{authorized}"\n',
    )
    env = ENV | {
        "GPU_POOL_MODEL_ROOTS": "",
        "GPU_POOL_CURVE_SECRET_KEY": "",
        "GPU_POOL_CURVE_AUTHORIZED_KEYS": "",
    }
    pool = load_config(str(path), env).pool
    assert (pool.model_roots, pool.curve_secret_key, pool.curve_authorized_keys) == (
        (),
        None,
        None,
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("HEARTBEAT_TIMEOUT_S", "abc", "must be a number > 0 (got 'abc')"),
        ("HEARTBEAT_TIMEOUT_S", "inf", "must be a number > 0 (got 'inf')"),
        ("BOOT_TIMEOUT_S", "-1", "must be a number > 0 (got -1.0)"),
        ("SURGE_MARGIN_MB", "1.5", "must be an integer >= 0 (got '1.5')"),
        ("SURGE_MARGIN_MB", "-3", "must be an integer >= 0 (got -3)"),
        ("STATE_DIR", "", "must be a non-empty path (got '')"),
        ("FRONTEND", "inproc://x", "inproc:// is only reachable inside the daemon"),
        ("CONTROL", "ipc://" + "x" * 108, "ipc path is 108 bytes"),
        ("LOG_FORMAT", "yaml", 'must be "text" or "json" (got \'yaml\')'),
        ("MODEL_ROOTS", "/no/such/dir", "no such directory /no/such/dir"),
        ("CURVE_SECRET_KEY", "/no/key", "no such file /no/key"),
    ],
)
def test_bad_env_value_is_named_after_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ENV | {f"GPU_POOL_{name}": value})
    prefix = f"env GPU_POOL_{name}: "
    assert any(p.startswith(prefix + expected) for p in info.value.problems), info.value.problems


def test_a_badly_typed_file_value_is_reported_even_when_env_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[pool]\nsurge_margin_mb = "lots"\n')
    env = ENV | {"GPU_POOL_SURGE_MARGIN_MB": "10"}
    assert problems_of(path, env) == ["pool.surge_margin_mb: must be an integer >= 0 (got 'lots')"]


def test_a_bad_env_value_hides_the_file_value_it_replaces(tmp_path: Path) -> None:
    # The file's out-of-range value is not checked (env replaces it) and must not be
    # reported under the variable's name either.
    path = write(tmp_path, "[pool]\nboot_timeout_s = -1\n")
    env = ENV | {"GPU_POOL_BOOT_TIMEOUT_S": "abc"}
    assert problems_of(path, env) == [
        "env GPU_POOL_BOOT_TIMEOUT_S: must be a number > 0 (got 'abc')"
    ]


# ------------------------------------------------------------------------ security


@pytest.mark.parametrize("key", ["frontend", "control"])
@pytest.mark.parametrize("host", ["0.0.0.0", "*", "10.1.2.3", "[::]", "eth0", "example.com"])
def test_non_loopback_tcp_is_refused_without_curve(tmp_path: Path, key: str, host: str) -> None:
    path = write(tmp_path, f'[pool]\n{key} = "tcp://{host}:6001"\n')
    assert problems_of(path) == [
        f"pool.{key}: refusing to listen on a non-loopback address without CURVE: "
        "set pool.curve_secret_key and pool.curve_authorized_keys "
        f"(got 'tcp://{host}:6001')"
    ]


def test_non_loopback_from_env_is_refused_with_the_env_name() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ENV | {"GPU_POOL_FRONTEND": "tcp://0.0.0.0:6001"})
    assert info.value.problems[0].startswith(
        "env GPU_POOL_FRONTEND: refusing to listen on a non-loopback address without CURVE"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "localhost", "[::1]"])
def test_loopback_tcp_needs_no_curve(tmp_path: Path, host: str) -> None:
    path = write(tmp_path, f'[pool]\nfrontend = "tcp://{host}:6001"\n')
    assert load_config(str(path), ENV).pool.frontend == f"tcp://{host}:6001"


def test_loopback_detection_covers_ipv4_mapped_ipv6() -> None:
    assert is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("::ffff:10.0.0.1")
    assert not is_loopback_host("128.0.0.1")


def test_non_loopback_tcp_is_accepted_with_curve(tmp_path: Path, curve: tuple[str, str]) -> None:
    secret, authorized = curve
    path = write(
        tmp_path,
        '[pool]\nfrontend = "tcp://0.0.0.0:6001"\ncontrol = "tcp://*:6002"\n'
        f'curve_secret_key = "{secret}"\ncurve_authorized_keys = "{authorized}"\n',
    )
    pool = load_config(str(path), ENV).pool
    assert (pool.frontend, pool.control) == ("tcp://0.0.0.0:6001", "tcp://*:6002")
    assert (pool.curve_secret_key, pool.curve_authorized_keys) == (secret, authorized)


def test_curve_with_one_half_missing_is_a_problem(tmp_path: Path, curve: tuple[str, str]) -> None:
    secret, _ = curve
    path = write(
        tmp_path, f'[pool]\nfrontend = "tcp://0.0.0.0:6001"\ncurve_secret_key = "{secret}"\n'
    )
    problems = problems_of(path)
    assert problems[0] == (
        "pool.curve_secret_key: must be set together with pool.curve_authorized_keys"
    )
    assert problems[1].startswith("pool.frontend: refusing to listen on a non-loopback")
    assert len(problems) == 2


def test_curve_public_key_given_as_secret_key(tmp_path: Path, curve: tuple[str, str]) -> None:
    secret, authorized = curve
    public = secret.removesuffix("_secret")
    path = write(
        tmp_path,
        f'[pool]\ncurve_secret_key = "{public}"\ncurve_authorized_keys = "{authorized}"\n',
    )
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"pool.curve_secret_key: {public} has no secret-key line")


def test_curve_authorized_keys_must_be_a_directory(tmp_path: Path, curve: tuple[str, str]) -> None:
    secret, _ = curve
    path = write(
        tmp_path,
        f'[pool]\ncurve_secret_key = "{secret}"\ncurve_authorized_keys = "{secret}"\n',
    )
    assert problems_of(path) == [f"pool.curve_authorized_keys: not a directory {secret}"]


# ----------------------------------------------------------------------- ipc paths


def test_ipc_path_length_limit(tmp_path: Path) -> None:
    ok = "/" + "a" * 106  # 107 bytes: the longest path that fits sun_path with its NUL
    path = write(tmp_path, f'[pool]\ncontrol = "ipc://{ok}"\n')
    assert load_config(str(path), ENV).pool.control == f"ipc://{ok}"
    long = ok + "b"
    path = write(tmp_path, f'[pool]\ncontrol = "ipc://{long}"\n')
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith("pool.control: ipc path is 108 bytes, over the kernel's 107")


def test_ipc_length_counts_bytes_not_characters(tmp_path: Path) -> None:
    path = write(tmp_path, f'[pool]\nfrontend = "ipc:///{"é" * 60}"\n')  # 121 bytes
    assert problems_of(path)[0].startswith("pool.frontend: ipc path is 121 bytes")


def test_a_too_long_default_control_path_is_reported(tmp_path: Path) -> None:
    deep = "/" + "d" * 100
    with pytest.raises(ConfigError) as info:
        load_config(None, {"HOME": "/h", "GPU_POOL_STATE_DIR": deep})
    assert info.value.problems[0].startswith("pool.control (default): ipc path is 114 bytes")


def test_ipc_path() -> None:
    assert ipc_path("ipc:///run/x.sock") == "/run/x.sock"
    assert ipc_path("ipc://rel/x.sock") == "rel/x.sock"
    assert ipc_path("ipc://@abstract") is None
    assert ipc_path("tcp://127.0.0.1:5555") is None
    assert ipc_path("ipc://") is None


# ------------------------------------------------------------------ check_model_path


def test_check_model_path_accepts_a_file_under_a_root(tmp_path: Path) -> None:
    model = model_file(tmp_path, "root/a/b/m.pt")
    other = tmp_path / "other"
    other.mkdir()
    assert check_model_path(str(model), [str(other), str(tmp_path / "root")]) == str(model)
    # Traversal that stays inside the root is fine and comes back resolved.
    dotted = f"{tmp_path}/root/a/../a/b/m.pt"
    assert check_model_path(dotted, [str(tmp_path / "root")]) == str(model)


def test_check_model_path_accepts_a_root_that_is_a_symlink(tmp_path: Path) -> None:
    model = model_file(tmp_path, "real/m.pt")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_model_path(str(tmp_path / "link" / "m.pt"), [str(tmp_path / "link")]) == str(model)


def test_check_model_path_refuses_a_path_outside_the_roots(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    outside = model_file(tmp_path, "root-evil/m.pt")  # shares the prefix, not the directory
    with pytest.raises(PathNotAllowed, match="outside the allowed model roots"):
        check_model_path(str(outside), [str(tmp_path / "root")])
    with pytest.raises(PathNotAllowed, match="outside the allowed model roots"):
        check_model_path(f"{tmp_path}/root/../root-evil/m.pt", [str(tmp_path / "root")])
    with pytest.raises(PathNotAllowed, match=r"\(none configured\)"):
        check_model_path(str(outside), [])


def test_check_model_path_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    secret = model_file(tmp_path, "private/weights.pt")
    (tmp_path / "root").mkdir()
    link = tmp_path / "root" / "m.pt"
    link.symlink_to(secret)
    with pytest.raises(PathNotAllowed) as info:
        check_model_path(str(link), [str(tmp_path / "root")])
    assert str(info.value) == (
        f"{link} (resolves to {secret}) is outside the allowed model roots: {tmp_path / 'root'}"
    )
    assert isinstance(info.value, ValueError)


def test_check_model_path_refuses_missing_files_and_non_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    with pytest.raises(PathNotAllowed, match="no such file"):
        check_model_path(str(root / "missing.pt"), [str(root)])
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        check_model_path(str(root / "dir"), [str(root)])
    os.mkfifo(root / "fifo")  # a loader would block forever on it
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        check_model_path(str(root / "fifo"), [str(root)])


# ---------------------------------------------------------------------- check_config


def test_check_config_reports_a_toml_syntax_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[pool]\nfrontend = "tcp://127.0.0.1:1"\nmetrics = \n')
    problems = check_config(str(path), ENV)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: TOML syntax error: ")
    assert "line 3" in problems[0]


def test_check_config_reports_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    assert check_config(str(tmp_path / "nope.toml"), ENV) == [
        f"{tmp_path / 'nope.toml'}: no such file"
    ]
    assert check_config(str(tmp_path), ENV)[0].startswith(f"{tmp_path}: cannot read: ")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[pool]\n")
    assert check_config(str(binary), ENV)[0].startswith(f"{binary}: not UTF-8 text")


def test_check_config_is_empty_for_a_good_file(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    path = write(tmp_path, f'[[models]]\nname = "m"\npath = "{model}"\ndevices = ["cpu"]\n')
    assert check_config(str(path), ENV) == []
    assert check_config(str(write(tmp_path, "", "empty.toml")), ENV) == []


def test_written_configs_read_back_whatever_the_text(tmp_path: Path) -> None:
    from pool.tomlwrite import write_config

    odd = ['emoji 😀', 'quote " back \\ slash', "tab\tnew\nline", "\x7f del", "é ü 中"]
    path = write_config(str(tmp_path / "p.toml"), {"frontend": odd[0]}, [{"name": s} for s in odd])
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    assert doc["pool"]["frontend"] == odd[0]
    assert [m["name"] for m in doc["models"]] == odd
