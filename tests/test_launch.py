"""launch/*.sh: the exact commands of --dry-run, that a real run executes exactly those, argument checks, shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
SCOPE = ["--name", "kt-a", "--zone", "us-central2-b"]
GC = ["--zone=us-central2-b"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def sh(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def dry(script: str, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The printed commands, each split as the shell would split it."""
    r = sh(script, "--dry-run", *args, env=env)  # first: arguments after -- belong to kt-jax run
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return [shlex.split(line) for line in r.stdout.splitlines()]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "world-tiny.yaml"
    path.write_text("run_dir: runs/world-tiny\n")
    return path


def test_scripts_present() -> None:
    assert SCRIPTS == ["gpu_run.sh", "tpu_create.sh", "tpu_delete.sh", "tpu_fetch.sh", "tpu_launch.sh", "tpu_logs.sh",
                       "tpu_run.sh", "tpu_setup.sh"]


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (CI installs it via .ci/setup-system: apt-get install shellcheck)")
    files = [str(p) for p in sorted(LAUNCH.glob("*.sh"))]
    r = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    r = sh(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script} ") and "--dry-run" in r.stdout


@pytest.mark.parametrize(
    ("accel", "runtime"),
    [("v4-8", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
     ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")],
)
def test_create_picks_the_runtime_for_the_generation(accel: str, runtime: str) -> None:
    assert dry("tpu_create.sh", *SCOPE, "--accelerator-type", accel) == [
        [*TPU, "create", "kt-a", *GC, f"--accelerator-type={accel}", f"--version={runtime}"]]


def test_create_queued_spot_in_a_project() -> None:
    lines = dry("tpu_create.sh", *SCOPE, "--accelerator-type", "v5litepod-16", "--queued", "--spot", "--project",
                "my-proj-1", "--runtime-version", "v2-alpha-tpuv5-lite")
    scope = [*GC, "--project=my-proj-1"]
    assert lines == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "kt-a", "--node-id=kt-a", *scope,
         "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "kt-a", *scope, "--format=value(state.state)"],
    ]


def test_setup_ships_the_checkout_installs_and_copies_data(tmp_path: Path, config: Path) -> None:
    lines = dry("tpu_setup.sh", *SCOPE, "--data", "gs://kt-bucket/data/dolly", "--checkpoint", str(tmp_path),
                env={"TMPDIR": "/tmp/kt"})
    tarball = "/tmp/kt/kt-jax-src-kt-a.tar.gz"
    assert lines[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
    assert lines[1] == [*TPU, "scp", *GC, "--worker=all", tarball, "kt-a:kt-jax-src.tar.gz"]
    assert lines[2][:8] == [*TPU, "ssh", "kt-a", *GC, "--worker=all"]
    install = shlex.split(lines[2][8].removeprefix("--command="))
    assert install[:2] == ["set", "-e;"] and "jax[tpu]" in install and "3.12" in install
    joined = " ".join(install)
    assert "tar -xzf kt-jax-src.tar.gz -C kt-jax && cd kt-jax" in joined
    assert "uv pip install --python .venv/bin/python --quiet -e . jax[tpu] &&" in joined
    assert lines[3] == [*TPU, "ssh", "kt-a", *GC, "--worker=all",
                        "--command=gcloud storage cp --recursive gs://kt-bucket/data/dolly kt-jax/data/"]
    assert lines[4] == [*TPU, "scp", *GC, "--worker=all", "--recurse", str(tmp_path), "kt-a:kt-jax/checkpoints/"]
    assert len(lines) == 5


def test_run_on_all_workers_with_distributed_auto(config: Path) -> None:
    lines = dry("tpu_run.sh", *SCOPE, "--config", str(config), "--", "train.steps=10", "name=a b")
    assert lines[0] == [*TPU, "scp", *GC, "--worker=all", str(config), "kt-a:kt-jax/launch-configs/world-tiny.yaml"]
    assert lines[1][:8] == [*TPU, "ssh", "kt-a", *GC, "--worker=all"] and len(lines) == 2
    remote = shlex.split(lines[1][8].removeprefix("--command="))
    assert remote == ["set", "-o", "pipefail;", "cd", "kt-jax", "&&", "mkdir", "-p", "logs", "&&",
                      "KT_JAX_DISTRIBUTED=auto", ".venv/bin/kt-jax", "run", "--config",
                      "launch-configs/world-tiny.yaml", "train.steps=10", "name=a b", "2>&1", "|", "tee",
                      "logs/world-tiny.log"]


def test_run_detached_then_follow_the_log(config: Path) -> None:
    lines = dry("tpu_run.sh", *SCOPE, "--config", str(config), "--detach", "--run-name", "r1")
    remote = lines[1][8].removeprefix("--command=")
    assert remote == ("cd kt-jax && mkdir -p logs && (nohup env KT_JAX_DISTRIBUTED=auto .venv/bin/kt-jax run "
                      "--config launch-configs/world-tiny.yaml > logs/r1.log 2>&1 < /dev/null &)")
    assert dry("tpu_logs.sh", *SCOPE, "--run-name", "r1", "--follow") == [
        [*TPU, "ssh", "kt-a", *GC, "--worker=0", "--command=tail -n +1 -F kt-jax/logs/r1.log"]]
    assert dry("tpu_logs.sh", *SCOPE, "--run-name", "r1", "--worker", "all") == [
        [*TPU, "ssh", "kt-a", *GC, "--worker=all", "--command=cat kt-jax/logs/r1.log"]]


def test_fetch_and_delete() -> None:
    assert dry("tpu_fetch.sh", *SCOPE, "--run-dir", "runs/world-tiny", "--dest", "out dir") == [
        ["mkdir", "-p", "out dir"],
        [*TPU, "scp", *GC, "--worker=0", "--recurse", "kt-a:kt-jax/runs/world-tiny", "out dir/"],
        [*TPU, "scp", *GC, "--worker=0", "--recurse", "kt-a:kt-jax/logs", "out dir/"],
    ]
    assert dry("tpu_delete.sh", *SCOPE) == [[*TPU, "delete", "kt-a", *GC, "--quiet"]]
    assert dry("tpu_delete.sh", *SCOPE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "kt-a", *GC, "--force", "--quiet"]]


def test_launch_is_the_steps_in_order(config: Path) -> None:
    common = [*SCOPE, "--project", "my-proj-1"]
    lines = dry("tpu_launch.sh", *common, "--accelerator-type", "v4-16", "--config", str(config), "--queued",
                "--data", "gs://kt-bucket/d", "--dest", "out", "--", "a=1", env={"TMPDIR": "/tmp/kt"})
    steps = [
        dry("tpu_create.sh", *common, "--accelerator-type", "v4-16", "--queued"),
        dry("tpu_setup.sh", *common, "--data", "gs://kt-bucket/d", env={"TMPDIR": "/tmp/kt"}),
        dry("tpu_run.sh", *common, "--config", str(config), "--", "a=1"),
        dry("tpu_fetch.sh", *common, "--run-dir", "runs", "--dest", "out"),
        dry("tpu_delete.sh", *common, "--queued"),
    ]
    assert lines == [line for step in steps for line in step]
    assert lines[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


def test_gpu_recipe(config: Path, tmp_path: Path) -> None:
    venv = str(tmp_path / "venv")
    lines = dry("gpu_run.sh", "--config", str(config), "--venv", venv, "--cuda", "13", "--", "seed=1")
    assert lines == [
        ["python3", "-m", "venv", venv],
        [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "-e", str(ROOT), "jax[cuda13]"],
        ["mkdir", "-p", "logs"],
        [f"{venv}/bin/python", "-c", "import jax; print(jax.devices())"],
        [f"{venv}/bin/kt-jax", "run", "--config", str(config), "seed=1", "2>&1", "|", "tee", "logs/world-tiny.log"],
    ]


def fake_tools(tmp_path: Path, fail_on: str = "") -> tuple[dict[str, str], Path]:
    """gcloud/git/mkdir stand-ins on PATH that record their argv (and fail when it contains `fail_on`)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("gcloud", "git", "mkdir"):
        script = bin_dir / tool
        script.write_text(
            "#!/usr/bin/env bash\n"
            f'printf "%s\\0" "{tool}" "$@" >> "{log}"; printf "\\n" >> "{log}"\n'
            'if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi\n'
            + (f'if [[ "$*" == *{shlex.quote(fail_on)}* ]]; then exit 3; fi\n' if fail_on else "")
        )
        script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": "/tmp/kt"}, log


def recorded(log: Path) -> list[list[str]]:
    return [rec.split("\0") for rec in log.read_text().split("\0\n") if rec.strip("\n")]


@pytest.mark.parametrize("fail", ["", "kt-jax run"])
def test_real_run_executes_exactly_the_printed_commands(tmp_path: Path, config: Path, fail: str) -> None:
    env, log = fake_tools(tmp_path, fail)
    args = [*SCOPE, "--accelerator-type", "v5litepod-16", "--config", str(config), "--queued", "--spot",
            "--data", "gs://kt-bucket/d", "--dest", str(tmp_path / "out"), "--", "a=1"]
    r = sh("tpu_launch.sh", *args, env=env)
    assert r.returncode == (3 if fail else 0), r.stderr
    expected = dry("tpu_launch.sh", *args, env=env)
    assert recorded(log) == [line for line in expected]  # also when the run fails: fetched, then deleted
    assert "+ gcloud compute tpus queued-resources create kt-a" in r.stderr  # each command is echoed as it runs


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("tpu_create.sh", ["--name", "kt-a", "--accelerator-type", "v4-8"], "--zone is required"),
        ("tpu_create.sh", [*SCOPE], "--accelerator-type is required"),
        ("tpu_create.sh", ["--name", "kt-a", "--zone", "us-central2", "--accelerator-type", "v4-8"],
         "--zone 'us-central2' is not a zone (expected REGION-ZONE"),
        ("tpu_create.sh", [*SCOPE, "--accelerator-type", "v9-8"], "--accelerator-type 'v9-8' is not a TPU accelerator"),
        ("tpu_create.sh", [*SCOPE, "--accelerator-type", "v5e"], "is not a TPU accelerator type (expected v2-N"),
        ("tpu_create.sh", ["--name", "My_TPU", "--zone", "us-central2-b", "--accelerator-type", "v4-8"],
         "--name 'My_TPU' is not a valid name"),
        ("tpu_create.sh", [*SCOPE, "--accelerator-type", "v4-8", "--project", "X"], "not a Google Cloud project id"),
        ("tpu_create.sh", [*SCOPE, "--accelerator-type", "v4-8", "--wait-timeout", "1h"],
         "--wait-timeout '1h' must be a whole number"),
        ("tpu_create.sh", [*SCOPE, "--bogus"], "unknown argument '--bogus'"),
        ("tpu_create.sh", [*SCOPE, "--accelerator-type"], "--accelerator-type needs a value"),
        ("tpu_setup.sh", [*SCOPE, "--data", "/no/such/dir"], "--data '/no/such/dir': neither a gs:// URI nor"),
        ("tpu_setup.sh", [*SCOPE, "--checkpoint", "gs://A_B"], "--checkpoint 'gs://A_B' is not a valid gs:// URI"),
        ("tpu_setup.sh", [*SCOPE, "--python", "python3"], "--python 'python3' must be a version like 3.12"),
        ("tpu_setup.sh", [*SCOPE, "--source", "/"], "--source '/' is not a git checkout"),
        ("tpu_run.sh", [*SCOPE], "--config is required"),
        ("tpu_run.sh", [*SCOPE, "--config", "configs/nope.yaml"], "--config 'configs/nope.yaml': no such file"),
        ("tpu_logs.sh", [*SCOPE], "--run-name is required"),
        ("tpu_logs.sh", [*SCOPE, "--run-name", "r", "--worker", "first"], "--worker 'first' must be a worker index"),
        ("tpu_fetch.sh", [*SCOPE, "--run-dir", "../etc", "--dest", "x"], "--run-dir '../etc' must be a relative path"),
        ("tpu_fetch.sh", [*SCOPE, "--run-dir", "/abs", "--dest", "x"], "--run-dir '/abs' must be a relative path"),
        ("tpu_fetch.sh", [*SCOPE, "--run-dir", "runs"], "--dest is required"),
        ("tpu_delete.sh", ["--zone", "us-central2-b"], "--name is required"),
        ("gpu_run.sh", [], "--config is required"),
        ("gpu_run.sh", ["--config", "nope.yaml"], "--config 'nope.yaml': no such file"),
    ],
)
def test_bad_arguments_are_rejected_clearly(script: str, args: list[str], message: str) -> None:
    r = sh(script, "--dry-run", *args)
    assert r.returncode == 2
    assert r.stdout == ""  # nothing would run
    assert f"{script}: error: " in r.stderr and message in r.stderr, r.stderr
    assert f'run "{script} --help" for usage' in r.stderr


def test_launch_checks_every_step_before_creating_anything(tmp_path: Path, config: Path) -> None:
    env, log = fake_tools(tmp_path)
    base = [*SCOPE, "--accelerator-type", "v4-8", "--config", str(config)]
    for bad, message in [(["--data", "/no/such"], "tpu_setup.sh: error: --data '/no/such'"),
                         (["--run-dir", "../x"], "tpu_fetch.sh: error: --run-dir '../x'"),
                         (["--config", "missing.yaml"], "tpu_run.sh: error: --config 'missing.yaml': no such file")]:
        r = sh("tpu_launch.sh", *base, *bad, env=env)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not log.exists()  # no gcloud call was made


def test_gpu_recipe_checks_the_python_version(config: Path, tmp_path: Path) -> None:
    old = tmp_path / "python3.10"
    old.write_text("#!/usr/bin/env bash\n"
                   'if [[ $1 == -V ]]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n')
    old.chmod(0o755)
    r = sh("gpu_run.sh", "--config", str(config), "--python", str(old), "--venv", str(tmp_path / "v"))
    assert r.returncode == 2 and "is Python 3.10.12; kt-jax needs Python >= 3.11" in r.stderr, r.stderr
