"""The README's API example runs as written; CI runs the README's test command verbatim."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_ci_runs_the_quickstart_test_command_verbatim():
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2 and "tauformer_model.train" in commands[0] and "pytest" in commands[1]
    assert all(c.startswith("python -m venv .venv && . .venv/bin/activate && ") for c in commands)
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_hugging_face_recipe_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers", minversion="5.4")
    section = README.read_text().split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    recipe = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)  # it saves a model folder
    scope = {}
    exec(compile(recipe, "README.md", "exec"), scope)
    assert scope["out"].shape == (1, 22)
    assert scope["model"].config._attn_implementation == "taumode"
