import pytest
from torch import nn

from lora_scaffold.errors import TargetError
from lora_scaffold.resolve import resolve_target


def test_dotted_target_resolves_to_the_class():
    target = resolve_target("torch.nn.ConvTranspose2d")
    assert target.cls is nn.ConvTranspose2d
    assert (target.import_module, target.class_name) == ("torch.nn", "ConvTranspose2d")


def test_file_target_resolves_and_imports_by_file_stem(tmp_path):
    path = tmp_path / "my_layers.py"
    path.write_text("from torch import nn\n\nclass Gate(nn.Linear):\n    pass\n")
    target = resolve_target(f"{path}:Gate")
    assert target.cls.__name__ == "Gate"
    assert target.import_module == "my_layers"
    assert target.from_file == path.resolve()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuchpkg_xyz.Layer", "no module named 'nosuchpkg_xyz'"),
        ("torch.nn.NoSuchLayer", "has no attribute 'NoSuchLayer'"),
        ("scaffold_targets.NotAModule", "not an nn.Module subclass"),
        ("scaffold_targets.NOT_A_MODULE", "not an nn.Module subclass"),
        ("Linear", "should look like"),
        ("torch.nn.", "should look like"),
        ("missing/file.py:Layer", "no such file"),
        ("file.txt:Layer", "should look like"),
    ],
)
def test_bad_targets_are_explained(spec, message):
    with pytest.raises(TargetError, match=message):
        resolve_target(spec)


def test_import_error_inside_the_target_module_is_reported_as_such(tmp_path):
    path = tmp_path / "broken_layers.py"
    path.write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(TargetError, match="importing .*broken_layers.py failed: ModuleNotFoundError"):
        resolve_target(f"{path}:Layer")
