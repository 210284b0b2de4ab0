"""Everything is declared in pyproject.toml; this file only puts ``finetune/finetune_launcher.pth`` at the top of the
wheel, where Python runs it at start-up (setuptools cannot declare a file outside a package). That line is how a user
error stays one line under ``accelerate launch`` and ``torchrun``: see ``finetune/launcher_exit.py``. An editable
install does not carry it; ``make install`` copies it into the virtual environment."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path("finetune") / "finetune_launcher.pth"


class BuildPyWithLauncherHook(build_py):
    def run(self):
        super().run()
        shutil.copyfile(PTH, Path(self.build_lib, PTH.name))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH.name))]


setup(cmdclass={"build_py": BuildPyWithLauncherHook})
