import pytest

from distillctl.errors import BadInput
from distillctl.recipe import load_recipe, validate_raw

from conftest import RECIPES


def _raw(**over):
    raw = {"name": "t", "data": {"dataset": "synthetic", "image_size": 32},
           "student": {"model": "resnet18"}, "method": {"name": "ce"}}
    raw.update(over)
    return raw


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert len(r.hash()) == 16
    assert r.student.model


def test_misspelt_key_names_key_and_suggestion():
    raw = _raw(train={"epoch": 3})
    with pytest.raises(BadInput) as e:
        validate_raw(raw)
    assert "unknown key 'train.epoch'" in e.value.message
    assert "did you mean 'train.epochs'" in e.value.message
    assert e.value.exit_code == 2


def test_misspelt_method_param_suggested():
    with pytest.raises(BadInput) as e:
        validate_raw(_raw(method={"name": "kd", "temprature": 2}))
    assert "method.temprature" in e.value.message and "method.temperature" in e.value.message


def test_unknown_method_suggests_closest():
    with pytest.raises(BadInput) as e:
        validate_raw(_raw(method={"name": "kdd"}))
    assert "'kd'" in e.value.message


def test_bad_value_reports_key():
    with pytest.raises(BadInput) as e:
        validate_raw(_raw(train={"epochs": 0}))
    assert "train.epochs" in e.value.message


def test_overrides_typed_and_hashed(tmp_path):
    p = tmp_path / "r.yaml"
    import yaml

    p.write_text(yaml.safe_dump(_raw(method={"name": "kd"})))
    base = load_recipe(p)
    r = load_recipe(p, ["train.epochs=2", "method.temperature=1.5", "data.augment.hflip=true"])
    assert r.train.epochs == 2 and isinstance(r.train.epochs, int)
    assert r.method.params()["temperature"] == 1.5
    assert r.data.augment.hflip is True
    assert r.hash() != base.hash()
    assert load_recipe(p, ["train.epochs=2", "method.temperature=1.5", "data.augment.hflip=true"]).hash() == r.hash()
    # defaults of the method are filled in, so the hash covers them
    assert base.method.params()["temperature"] == 4.0
    with pytest.raises(BadInput) as e:
        load_recipe(p, ["train.lrr=0.1"])
    assert "train.lr" in e.value.message
    with pytest.raises(BadInput):
        load_recipe(p, ["no_equals_sign"])


def test_recipe_is_inert_yaml(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("student: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(BadInput):
        load_recipe(p)


def test_dynamic_batch_checked():
    with pytest.raises(BadInput) as e:
        validate_raw(_raw(export={"dynamic_batch": "8:1:32"}))
    assert "export.dynamic_batch" in e.value.message


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
@pytest.mark.parametrize("method", ["kd", "hcd", "dkd"])
def test_set_method_name_switches_cleanly_on_every_shipped_recipe(recipe, method):
    """The other method's parameters are dropped with a note; the new method's defaults fill in."""
    from distillctl.methods import registry

    path = RECIPES / recipe
    r = load_recipe(path, [f"method.name={method}"])
    assert r.method.name == method
    assert set(r.method.params()) == set(registry.get(method).Config.model_fields)
    # a parameter given on the command line is kept, and validated against the new method
    assert load_recipe(path, [f"method.name={method}", "method.temperature=2.0"]).method.params()["temperature"] == 2.0
