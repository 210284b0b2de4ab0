"""A user error stays one line under ``accelerate launch`` and ``torchrun``: exit status 2, no traceback.

A recipe reports a user's mistake as one ``error: ...`` line and exits with status 2 (:data:`EXIT_USER_ERROR`,
``finetune.launch.launch``). Under a launcher the recipe is a child process, and the launcher in the parent turns
any failed child into a traceback and exit status 1: ``subprocess.CalledProcessError`` from accelerate's
one-process launcher, ``ChildFailedError`` from torch.distributed's elastic agent (``--multi_gpu``, FSDP, ``torchrun``),
after two log lines of its own. No option of either launcher changes that (accelerate's ``--quiet`` still exits 1),
so the parent needs a hook, and the only code of ours a launcher's parent runs is a ``.pth`` file:
``finetune_launcher.pth`` (installed into site-packages with the package) calls :func:`install_if_launcher` at
start-up, which does nothing unless the process is one of those launchers. In a launcher it:

- replaces the uncaught-exception report for a child that exited with status 2: the parent exits 2 and prints
  nothing more (one process: the child printed the line), or prints the line the first failing child wrote to its
  torch elastic error file (several processes: each child writes its line there instead of printing it, so the
  line appears once, whichever rank failed first);
- holds the elastic agent's "Sending process N closing signal" and "failed (exitcode: 2)" log lines of such a
  failure, and emits them unchanged for any other failure.

Every other failure (a crash, a signal, an exit status other than 2) keeps the launcher's own report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

EXIT_USER_ERROR = 2
ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"
LAUNCHER_SCRIPTS = ("accelerate-launch", "torchrun")
LAUNCHER_MODULES = ("accelerate.commands.launch", "accelerate.commands.accelerate_cli", "torch.distributed.run")


def is_launcher(orig_argv: list[str]) -> bool:
    """Whether a process started with ``orig_argv`` (``sys.orig_argv``: interpreter, options, script or ``-m``
    module, arguments) is ``accelerate launch``, ``accelerate-launch`` or ``torchrun``."""
    args = orig_argv[1:]
    while args and args[0].startswith("-") and args[0] != "-m":  # interpreter options such as -u or -X
        args = args[1:]
    if len(args) >= 2 and args[0] == "-m":
        module, rest = args[1], args[2:]
        return module in LAUNCHER_MODULES and (module != "accelerate.commands.accelerate_cli" or rest[:1] == ["launch"])
    if not args:
        return False
    script = os.path.basename(args[0]).removesuffix(".exe")
    return script in LAUNCHER_SCRIPTS or (script == "accelerate" and args[1:2] == ["launch"])


def report_in_child(line: str) -> None:
    """Report ``line`` from a recipe process: into its torch elastic error file when a multi-process launcher gave
    it one (the parent prints the first failing rank's line once), else on stderr."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                # A string message is shown as it is by torch elastic's failure summary, too, without our hook.
                json.dump({"message": line, "timestamp": int(time.time())}, f)
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


def user_error_line(error: BaseException) -> str | None:
    """The parent's report for an uncaught launcher exception that is a child's user error: ``""`` when the child
    printed its line itself, the line when it wrote it to its elastic error file; ``None`` for any other failure."""
    returncode = getattr(error, "returncode", None)  # subprocess.CalledProcessError
    if returncode is not None:
        return "" if returncode == EXIT_USER_ERROR else None
    first_failure = getattr(error, "get_first_failure", None)  # torch.distributed.elastic ChildFailedError
    if first_failure is None:
        return None
    _, failure = first_failure()
    if failure.exitcode != EXIT_USER_ERROR:
        return None
    return failure.message if isinstance(failure.message, str) else ""


class HeldElasticLines(logging.Filter):
    """Holds the elastic agent's closing-signal lines until the failure they belong to is logged: dropped with a
    user error's ``failed (exitcode: 2)``, released unchanged otherwise (and at exit)."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger
        self.held: list[logging.LogRecord] = []
        self.releasing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.releasing:
            return True
        if record.msg.startswith("Sending process"):
            self.held.append(record)
            return False
        if record.msg.startswith("failed (exitcode") and record.args and record.args[0] == EXIT_USER_ERROR:
            self.held.clear()
            return False
        self.release()
        return True

    def release(self) -> None:
        held, self.held = self.held, []
        self.releasing = True
        try:
            for record in held:
                self.logger.handle(record)
        finally:
            self.releasing = False


def install() -> None:
    """Hook this (launcher) process: see the module docstring."""
    logger = logging.getLogger(ELASTIC_LOGGER)
    held = HeldElasticLines(logger)
    logger.addFilter(held)
    previous_hook = sys.excepthook

    def excepthook(kind, error, traceback):
        line = user_error_line(error)
        if line is None:
            held.release()
            previous_hook(kind, error, traceback)
            return
        if line:
            print(line, file=sys.stderr)
        import atexit

        atexit._run_exitfuncs()  # what a normal exit runs; os._exit below is the only way to pick the status here
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)

    sys.excepthook = excepthook


def install_if_launcher() -> None:
    """What ``finetune_launcher.pth`` runs at every interpreter start-up: :func:`install` in a launcher, else
    nothing. It must never break an interpreter's start-up, so any failure here is ignored."""
    try:
        if is_launcher(list(getattr(sys, "orig_argv", sys.argv))):
            install()
    except Exception:  # a start-up hook that raised would break every Python process
        pass
