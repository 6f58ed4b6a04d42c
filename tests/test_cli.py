"""The error boundary of every CLI (lymphnode.core.boundary) and the ``lymphnode`` console script
(lymphnode.cli), run as the user runs them: ``python -m lymphnode <command> ...`` in a subprocess.

Bad input (a LymphnodeError, also inside Hydra's ``instantiate``) must end in one ``error:`` line on
stderr and exit code 1; a bug in a traceback and exit code 2; a failing job of a ``--multirun``
sweep must not stop the other jobs, and the sweep exits non-zero.
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from lymphnode.cli import COMMANDS, main, usage
from lymphnode.core.boundary import (
    EXIT_BUG,
    EXIT_USER_ERROR,
    cli_boundary,
    config_dir,
    user_error_of,
)
from lymphnode.core.errors import CacheError, ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}


def run(*args: str, cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m lymphnode <args>`` (or ``python -c <code> <args>``) in ``cwd``."""
    head = ["-c", code] if code is not None else ["-m", "lymphnode"]
    return subprocess.run(
        [sys.executable, *head, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_user_error(result: subprocess.CompletedProcess, expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USER_ERROR, output
    assert "Traceback" not in output and "InstantiationException" not in output, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    assert expected in lines[0], output


# --- bad input: one line, exit 1 ----------------------------------------------------------------
def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Per command: arguments with a bad input, and what its one error line must say."""
    return {
        "synth": (
            ["n_tumor=-1", f"out_dir={tmp}/synth"],
            "n_tumor must be an integer >= 0, got -1",
        ),
        "prepare": ([f"paths.root={tmp}/none"], f"{tmp}/none/slides is not a directory"),
        "infer": (
            [f"checkpoint={tmp}/none.ckpt", f"slides={tmp}", f"out_dir={tmp}/wsi"],
            f"slides={tmp} is a folder without slides",
        ),
        "evaluate": (
            [f"heatmaps={tmp}", f"annotations={tmp}"],
            f"no *.heatmap.tif files in heatmaps={tmp}",
        ),
        "report": ([f"{tmp}/none"], f"sweep folder {tmp}/none does not exist"),
        "cache": (["info", f"{tmp}/none"], f"patch cache not found: {tmp}/none"),
        "annotations": (
            ["to-mask", f"{tmp}/a.tif", f"{tmp}/a.xml", f"{tmp}/a_mask.tif"],
            f"{tmp}/a.xml: annotation file not found",
        ),
    }


@pytest.mark.parametrize("command", ["synth", "prepare", "infer", "evaluate", "report", "cache",
                                     "annotations"])  # fmt: skip
def test_bad_input_prints_one_error_line_and_exits_1(command: str, tmp_path: Path) -> None:
    args, expected = _bad_inputs(tmp_path)[command]
    assert_one_line_user_error(run(command, *args, cwd=tmp_path), expected)


def test_train_error_raised_inside_instantiate_is_one_line_not_a_hydra_wrapper(
    tmp_path: Path,
) -> None:
    # The DataModule is built by hydra.utils.instantiate, which wraps the CacheError it raises in
    # an InstantiationException; the boundary reports the CacheError itself.
    result = run("train", "experiment=scratch", f"paths.root={tmp_path}", "logger=csv",
                 "trainer=cpu", cwd=tmp_path)  # fmt: skip
    assert_one_line_user_error(result, f"patch cache not found: {tmp_path}/caches/labeled")


def test_argparse_usage_error_exits_1_not_the_bug_code(tmp_path: Path) -> None:
    result = run("report", "--no-such-option", str(tmp_path), cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR
    assert "unrecognized arguments: --no-such-option" in result.stderr


# --- bugs: traceback, exit 2 --------------------------------------------------------------------
BUG = "def bug(*args, **kwargs):\n    raise ZeroDivisionError('a deliberate bug')\n"


@pytest.mark.parametrize(
    ("module", "function", "call"),
    [
        ("lymphnode.synth", "generate_slides", "sys.argv = ['synth', 'out_dir=out']; m.main()"),
        ("lymphnode.train", "train", "sys.argv = ['train', 'logger=csv']; m.main()"),
        ("lymphnode.report", "collect_runs", "sys.exit(m.main(['runs']))"),
    ],
)
def test_a_bug_prints_the_traceback_and_exits_2(
    module: str, function: str, call: str, tmp_path: Path
) -> None:
    # The real entry point with one of the functions it calls replaced by a failing one.
    code = f"import sys\nimport {module} as m\n{BUG}m.{function} = bug\n{call}\n"
    result = run(cwd=tmp_path, code=code)
    assert result.returncode == EXIT_BUG, result.stdout + result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "ZeroDivisionError: a deliberate bug" in result.stderr
    assert not error_lines(result)


# --- --multirun: the other jobs run, the sweep exits non-zero -----------------------------------
def test_a_failing_sweep_job_does_not_stop_the_others_and_the_sweep_exits_1(
    tmp_path: Path,
) -> None:
    result = run("synth", "--multirun", "n_tumor=-1,1", "n_normal=0", "width=1024", "height=1024",
                 "workers=0", "out_dir=out${n_tumor}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert (tmp_path / "out1" / "slides" / "tumor_001.tif").is_file()  # the second job ran
    assert error_lines(result) == ["error: synth: n_tumor must be an integer >= 0, got -1"]
    assert "Traceback" not in result.stderr  # Hydra reports the failed job in one line too
    assert "Error executing job with overrides: ['n_tumor=-1'" in result.stderr


def test_a_bug_in_a_sweep_job_does_not_stop_the_others_and_shows_its_traceback(
    tmp_path: Path,
) -> None:
    code = textwrap.dedent(
        """
        import sys
        import lymphnode.synth as m
        real = m.generate_slides
        def generate_slides(out_dir, **kwargs):
            if kwargs["seed"] == 1:
                raise ZeroDivisionError("a deliberate bug")
            return real(out_dir, **kwargs)
        m.generate_slides = generate_slides
        sys.argv = ["synth", "--multirun", "seed=1,2", "n_tumor=1", "n_normal=0", "width=1024",
                    "height=1024", "workers=0", "out_dir=out${seed}"]
        m.main()
        """
    )
    result = run(cwd=tmp_path, code=code)
    assert result.returncode != 0, result.stdout + result.stderr
    assert (tmp_path / "out2" / "slides" / "tumor_001.tif").is_file()
    assert not (tmp_path / "out1" / "slides").exists()
    assert "ZeroDivisionError: a deliberate bug" in result.stderr


# --- the boundary in-process --------------------------------------------------------------------
def test_user_error_is_found_through_the_instantiate_wrapper() -> None:
    error = CacheError("patch cache not found: /x")
    try:
        try:
            raise error
        except CacheError as inner:
            raise InstantiationException("Error in call to target 'X'") from inner
    except InstantiationException as wrapped:
        assert user_error_of(wrapped) is error
    assert user_error_of(ZeroDivisionError("bug")) is None


def test_cli_boundary_returns_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    def user_error(argv: list[str]) -> int:
        raise ConfigError(f"option={argv[0]!r} is invalid; expected a or b")

    def bug(argv: list[str]) -> int:
        raise KeyError("oops")

    assert cli_boundary(lambda argv: 0)(["a"]) == 0
    assert cli_boundary(user_error)(["c"]) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: option='c' is invalid; expected a or b\n"
    assert cli_boundary(bug)([]) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'oops'" in err


def test_logs_go_through_tqdm_while_a_bar_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    from tqdm import tqdm

    def with_bar(argv: list[str]) -> int:
        with tqdm(total=2, desc="slides", file=sys.stderr, ncols=60) as bar:
            bar.update(1)
            logging.getLogger("lymphnode.test").warning("halfway")
            bar.update(1)
        return 0

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # what basicConfig / Hydra's job logging install
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old = root.handlers[:]
    root.handlers = [handler]
    try:
        assert cli_boundary(with_bar)([]) == 0
    finally:
        root.handlers = old
    err = capsys.readouterr().err
    # tqdm.write clears the bar, prints the line on a line of its own and redraws the bar
    assert "\nWARNING lymphnode.test: halfway\n" in err.replace("\r", "\n")
    assert root.handlers == old


def test_config_dir_is_the_top_level_conf() -> None:
    path = Path(config_dir())
    assert (path / "train.yaml").is_file()
    assert path.resolve() == (PROJECT_ROOT / "conf").resolve()  # one source of truth


# --- the console script -------------------------------------------------------------------------
def _cli_modules() -> set[str]:
    """Top-level modules of the package that run as ``python -m lymphnode.<name>``."""
    names = set()
    for path in (PROJECT_ROOT / "lymphnode").glob("*.py"):
        if path.stem.startswith("_") or path.stem == "cli":
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in tree.body):  # fmt: skip
            names.add(path.stem)
    return names


def test_every_cli_module_is_a_command_with_one_help_line() -> None:
    assert set(COMMANDS) == _cli_modules()
    lines = usage().splitlines()
    for name, command in COMMANDS.items():
        assert command.module == f"lymphnode.{name}"
        matching = [line for line in lines if line.split()[:1] == [name]]
        assert len(matching) == 1 and command.help in matching[0]


def test_help_lists_the_commands_without_importing_torch(tmp_path: Path) -> None:
    code = "import sys\nfrom lymphnode.cli import main\nrc = main(['--help'])\n" \
           "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)"  # fmt: skip
    result = run(cwd=tmp_path, code=code)
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in result.stdout


def test_unknown_command_names_it_and_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and "annotations" in err
    assert main([]) == EXIT_USER_ERROR  # no command: the usage on stderr
    assert "usage: lymphnode <command>" in capsys.readouterr().err


def test_a_command_runs_like_python_m(tmp_path: Path) -> None:
    via_script = run("synth", "n_tumor=1", "n_normal=0", "width=1024", "height=1024",
                     "workers=0", "out_dir=a", cwd=tmp_path)  # fmt: skip
    assert via_script.returncode == 0, via_script.stderr
    via_module = subprocess.run(
        [sys.executable, "-m", "lymphnode.synth", "n_tumor=1", "n_normal=0", "width=1024",
         "height=1024", "workers=0", "out_dir=b"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert via_module.returncode == 0, via_module.stderr
    a = (tmp_path / "a" / "slides" / "tumor_001.tif").read_bytes()
    assert a == (tmp_path / "b" / "slides" / "tumor_001.tif").read_bytes()


# --- wandb never touches the network unless configured ------------------------------------------
WANDB_RUN = textwrap.dedent(
    """
    import ipaddress, socket, sys
    contacted = []

    def audit(event, args):
        host = None
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect" and isinstance(args[1], tuple):
            host = args[1][0]
        if host is None:
            return
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host == "localhost":
                return
        contacted.append(f"{event} {host}")

    sys.addaudithook(audit)
    import lymphnode  # noqa: F401
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lymphnode.core.boundary import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["logger=wandb", f"run_dir={sys.argv[1]}"])
    logger = instantiate(cfg.logger.wandb)
    logger.log_metrics({"val/seg_f1": 0.5}, step=0)
    print("mode", logger.experiment.settings.mode)
    logger.experiment.finish()
    print("contacted", contacted)
    """
)


def test_wandb_stays_offline_and_resolves_no_host_when_not_configured(tmp_path: Path) -> None:
    import socket

    proxy = socket.socket()  # any HTTP(S) request of wandb's service would arrive here
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.setblocking(False)
    url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}  # the user set nothing
    env.update(HOME=str(tmp_path), HTTP_PROXY=url, HTTPS_PROXY=url, http_proxy=url,
               https_proxy=url, NO_PROXY="localhost,127.0.0.1", no_proxy="localhost,127.0.0.1")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", WANDB_RUN, str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mode offline" in result.stdout
    assert "contacted []" in result.stdout, result.stdout
    with pytest.raises(BlockingIOError):
        proxy.accept()  # nobody connected to the proxy
    proxy.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_quiet_third_party_drops_the_known_notices_and_nothing_else() -> None:
    import warnings

    from lymphnode.core.boundary import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=2
        )
        warnings.warn("The number of training batches (3) is smaller than the logging interval "
                      "Trainer(log_every_n_steps=50).", UserWarning, stacklevel=2)  # fmt: skip
        warnings.warn(
            "Precision bf16-mixed is not supported by the model summary.", UserWarning, stacklevel=2
        )
        warnings.warn("a warning about this run", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["a warning about this run"]

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        logger.warning("💡 Tip: For seamless cloud logging and experiment tracking, try ...")
        logger.warning("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
    assert records == ["GPU available: False, used: False"]


def test_a_dispatched_hydra_command_is_what_ddp_rank_processes_rerun(tmp_path: Path) -> None:
    # Lightning's DDP launcher starts ranks 1..N-1 by re-running this process's command line; under
    # `lymphnode train ...` that must be `python -m lymphnode.train ...`, not the dispatcher.
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit\n"
        "def _show():\n"
        "    from lightning_fabric.strategies.launchers.subprocess_script import "
        "_basic_subprocess_cmd\n"
        "    print('rerun:', _basic_subprocess_cmd()[1:])\n"
        "atexit.register(_show)\n"
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lymphnode", "synth", "--cfg", "job", "n_tumor=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "n_tumor: 3" in result.stdout
    assert "rerun: ['-m', 'lymphnode.synth', '--cfg', 'job', 'n_tumor=3']" in result.stdout
