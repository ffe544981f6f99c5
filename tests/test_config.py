"""Configuration: where the model repository comes from (LATENTEDIT_REPOSITORY > file > default)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from latentedit.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"repository": str(tmp_path / "from-file")}))
    return path


def test_the_repository_is_the_environment_variable_then_the_file_then_the_default(config_file, tmp_path, monkeypatch):
    monkeypatch.delenv("LATENTEDIT_REPOSITORY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config(None).repository == str(tmp_path / "model-repo")  # relative to the working directory
    assert load_config(config_file).repository == str(tmp_path / "from-file")
    monkeypatch.setenv("LATENTEDIT_REPOSITORY", str(tmp_path / "from-env"))
    assert load_config(config_file).repository == str(tmp_path / "from-env")
    assert load_config(None).repository == str(tmp_path / "from-env")
    monkeypatch.setenv("LATENTEDIT_REPOSITORY", "")  # set but empty: as if unset
    assert load_config(config_file).repository == str(tmp_path / "from-file")


def _models_list(config_file, repository):
    env = {k: v for k, v in os.environ.items() if k != "LATENTEDIT_REPOSITORY"}
    if repository is not None:
        env["LATENTEDIT_REPOSITORY"] = str(repository)
    result = subprocess.run([sys.executable, "-m", "latentedit", "--config", str(config_file), "models", "list"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_cli_lists_the_repository_named_by_the_environment(installed_repo, config_file, tmp_path):
    # The file names an empty folder; the environment names the installed repository.
    listed = _models_list(config_file, installed_repo.root)
    assert "dcgan-faces" in listed and "no models" not in listed, listed
    assert f"no models in {tmp_path / 'from-file'}" in _models_list(config_file, None)
