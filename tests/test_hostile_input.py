"""Hostile and mistyped input (issue 10, bad-input half): every case is exit 2 with a short message.

The classes are the point, not the list: parsing limits (size, depth, aliases), message size,
range checks, the run-folder name, timm model names and kwargs, and malformed data sets. Most
cases call the library in-process (fast); a handful go through the CLI (in-process, Typer's runner)
to prove exit code 2, one line on stderr and no traceback, and one through the real console entry
point in a subprocess.
"""
import os
import pickle
import re
import time

import numpy as np
import pytest
import torch
import yaml

from distillctl import recipe as R
from distillctl.data import build_data
from distillctl.errors import BadInput
from distillctl.models import create_model
from distillctl.recipe import AugmentConfig, DataConfig, StudentConfig, TeacherConfig, load_recipe, validate_raw

from conftest import RECIPES, cli, run_cli

SMOKE = RECIPES / "ci_smoke.yaml"
CPU = torch.device("cpu")


def _smoke_raw() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def _write(tmp_path, text: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _refused(fn, *args, match: str = "", max_len: int = 600, max_s: float = 10.0, **kw) -> str:
    """Call ``fn``; it must raise BadInput (exit 2) quickly, with a short one-line message holding ``match``."""
    t = time.perf_counter()
    with pytest.raises(BadInput) as e:
        fn(*args, **kw)
    dt = time.perf_counter() - t
    msg = e.value.message
    assert e.value.exit_code == 2
    assert match in msg, msg
    assert len(msg) <= max_len, f"{len(msg)} characters: {msg[:300]}..."
    assert "\n" not in msg, msg
    assert dt < max_s, f"took {dt:.1f}s"
    return msg


def _smoke_with_kwargs(block: str) -> str:
    """ci_smoke.yaml with ``block`` (indented YAML lines) as the student's kwargs (in place of its own)."""
    text, n = re.subn(r"student:\n  model: resnet10t\n  kwargs: [^\n]*\n", "student:\n  model: resnet10t\n  kwargs:\n"
                      + block.replace("\\", "\\\\"), SMOKE.read_text())
    assert n == 1, "ci_smoke.yaml's student block changed"
    return text


# ----------------------------------------------------------------------------- parsing limits


class TestParsingLimits:
    def test_alias_bomb_in_student_kwargs_is_refused_fast(self, tmp_path):
        lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
        for i in range(1, 10):  # 10**10 values once expanded
            lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
        p = _write(tmp_path, _smoke_with_kwargs("\n".join(lines) + "\n"))
        msg = _refused(load_recipe, p, match="refused", max_s=2.0)
        assert "aliases expanded" in msg and "line" in msg

    def test_alias_bomb_in_a_set_value(self):
        v = ("{a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], "
             "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], "
             "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d, *d, *d]}")
        _refused(load_recipe, SMOKE, ["student.kwargs=" + v], match="refused", max_s=2.0)

    def test_many_small_aliases_are_counted(self, tmp_path):
        body = "    base: &b 1\n" + "".join(f"    k{i}: *b\n" for i in range(R.MAX_ALIASES + 1))
        _refused(load_recipe, _write(tmp_path, _smoke_with_kwargs(body)), match=f"more than {R.MAX_ALIASES} aliases")

    def test_a_few_aliases_and_merge_keys_still_work(self, tmp_path):
        text = SMOKE.read_text().replace("  train: {epochs: 2,", "  train: &tt {epochs: 2,")
        text = text.replace("train:\n  epochs: 1", "train:\n  <<: *tt\n  epochs: 1")
        r = load_recipe(_write(tmp_path, text))
        assert r.teacher.train.epochs == 2 and r.train.epochs == 1 and r.train.optimizer == "sgd"
        assert r.train.weight_decay == 0.05  # merged from the teacher's block

    def test_recursive_alias(self, tmp_path):
        p = _write(tmp_path, _smoke_with_kwargs("    loop: &k [1, *k]\n"))
        _refused(load_recipe, p, match="refers to a value that contains it")

    @pytest.mark.parametrize("style", ["flow", "block"])
    def test_5000_deep_nesting_no_recursion_error(self, tmp_path, style):
        if style == "flow":
            text = "a: " + "[" * 5000 + "]" * 5000 + "\n"
        else:
            text = "".join("  " * i + f"k{i}:\n" for i in range(5000)) + "  " * 5000 + "v\n"
        msg = _refused(load_recipe, _write(tmp_path, text), max_s=5.0)
        assert "nest" in msg

    def test_depth_just_under_the_limit_reaches_validation(self, tmp_path):
        deep = "[" * (R.MAX_DEPTH - 4) + "1" + "]" * (R.MAX_DEPTH - 4)  # recipe/student/kwargs/x + lists
        p = _write(tmp_path, _smoke_with_kwargs(f"    x: {deep}\n"))
        msg = _refused(load_recipe, p, match="timm cannot build student.model resnet10t")
        assert "nested" not in msg

    def test_deep_dotted_set_key(self):
        _refused(load_recipe, SMOKE, ["student.kwargs." + ".".join(["a"] * 5000) + "=1"], match="not a dotted recipe key")

    def test_huge_set_value(self):
        _refused(load_recipe, SMOKE, ["student.kwargs.x=" + "1" * (R.MAX_SET_BYTES + 1)], match="too long")

    def test_recipe_file_size_limit(self, tmp_path):
        p = _write(tmp_path, SMOKE.read_text() + "# " + "x" * R.MAX_RECIPE_BYTES + "\n")
        _refused(load_recipe, p, match="limit 1048576")

    def test_too_many_values(self, tmp_path):
        body = "    big: [" + ", ".join(["1"] * (R.MAX_NODES + 10)) + "]\n"
        _refused(load_recipe, _write(tmp_path, _smoke_with_kwargs(body)), match=f"more than {R.MAX_NODES} values")

    def test_python_side_shared_structure_bomb(self):
        bomb = [1] * 10
        for _ in range(9):
            bomb = [bomb] * 10
        raw = _smoke_raw()
        raw["student"]["kwargs"] = {"x": bomb}
        _refused(validate_raw, raw, match="values", max_s=2.0)

    def test_python_side_cycle(self):
        raw = _smoke_raw()
        loop = []
        loop.append(loop)
        raw["student"]["kwargs"] = {"x": loop}
        _refused(validate_raw, raw, match="refused", max_s=2.0)

    def test_duplicate_key(self, tmp_path):
        text = SMOKE.read_text()
        p = _write(tmp_path, text + "train: {epochs: 3}\n")
        msg = _refused(load_recipe, p, match="duplicate key 'train'")
        assert f"line {len(text.splitlines()) + 1}" in msg  # the line of the second 'train

    def test_integer_past_python_digit_limit(self, tmp_path):
        p = _write(tmp_path, SMOKE.read_text().replace("seed: 0", "seed: " + "9" * 5000))
        _refused(load_recipe, p, match="cannot read a value")

    def test_integer_beyond_64_bits(self):
        _refused(load_recipe, SMOKE, ["seed=99999999999999999999999"], match="out of range")
        _refused(load_recipe, SMOKE, ["student.kwargs.depth=99999999999999999999999"], match="student.kwargs.depth")

    @pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
    def test_non_finite_numbers(self, value):
        _refused(load_recipe, SMOKE, [f"train.lr={value}"], match="train.lr")
        _refused(load_recipe, SMOKE, [f"method.temperature={value}"], match="method.temperature")

    def test_non_text_key(self, tmp_path):
        p = _write(tmp_path, SMOKE.read_text().replace("  w_kd: 1.0", "  w_kd: 1.0\n  on: 3"))
        _refused(load_recipe, p, match="key True at method must be text")

    @pytest.mark.parametrize("text,match", [
        ("- a\n- b\n", "must be a YAML mapping"),
        ("just a string\n", "must be a YAML mapping"),
        ("student: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
        ("a: [1, 2\n", "not valid YAML"),
        ("a: b: c\n", "not valid YAML"),
        ("a: *nowhere\n", "not valid YAML"),
        ("a: \"\x00\"\n", "not valid YAML"),
    ])
    def test_malformed_yaml(self, tmp_path, text, match):
        _refused(load_recipe, _write(tmp_path, text), match=match)

    def test_not_utf8(self, tmp_path):
        p = tmp_path / "r.yaml"
        p.write_bytes(b"name: \xff\xfe\x00\x00garbage\n")
        _refused(load_recipe, p, match="not UTF-8")

    def test_missing_file_and_folder_and_device(self, tmp_path):
        _refused(load_recipe, tmp_path / "nope.yaml", match="not found")
        _refused(load_recipe, tmp_path, match="not a regular file")
        _refused(load_recipe, "/dev/zero", match="not a regular file")  # never read forever

    def test_fifo_is_not_read(self, tmp_path):
        fifo = tmp_path / "r.yaml"
        os.mkfifo(fifo)
        _refused(load_recipe, fifo, match="not a regular file", max_s=2.0)


# ----------------------------------------------------------------------------- message size


class TestMessages:
    def test_wrong_typed_value_holding_a_huge_list(self, tmp_path):
        n = R.MAX_NODES - 200
        p = _write(tmp_path, SMOKE.read_text().replace("seed: 0", "seed: [" + ", ".join(['"x"'] * n) + "]"))
        msg = _refused(load_recipe, p, match="seed: Input should be a valid integer", max_len=300)
        assert "..." in msg

    def test_many_errors_are_capped(self, tmp_path):
        raw = _smoke_raw()
        raw["bench"]["batch_sizes"] = ["x"] * 20
        raw["bench"]["iters"] = "many"
        raw["train"]["epochs"] = "lots"
        msg = _refused(validate_raw, raw, max_len=1500)
        assert msg.count("Input should be") <= R.MAX_LISTED_ERRORS and "more errors" in msg

    def test_huge_unknown_key(self):
        _refused(load_recipe, SMOKE, ["train." + "k" * 10000 + "=1"], match="unknown key 'train.kkk", max_s=3.0)

    def test_huge_method_name(self):
        _refused(load_recipe, SMOKE, ["method.name=" + "kd" * 5000], match="unknown method.name", max_s=3.0)

    def test_huge_string_in_wrong_place(self):
        _refused(load_recipe, SMOKE, ["train.optimizer=" + "x" * 10000], match="train.optimizer")

    def test_short_repr_is_bounded_on_any_value(self):
        assert len(R.short(list(range(10 ** 6)))) <= R.MAX_QUOTE
        assert len(R.short("y" * 10 ** 6)) <= R.MAX_QUOTE
        assert len(R.short({str(i): [i] * 100 for i in range(1000)})) <= R.MAX_QUOTE
        assert R.short(10 ** 5000) != ""  # an int too long for str() still gives something


# ----------------------------------------------------------------------------- range checks


RANGE_CASES = [
    ("data.image_size=100000", "data.image_size"),
    ("data.image_size=4", "data.image_size"),
    ("student.image_size=5000", "student.image_size"),
    ("teacher.image_size=100000", "teacher.image_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=1000000", "data.batch_size"),
    ("data.val_batch_size=-3", "data.val_batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.num_workers=100000", "data.num_workers"),
    ("data.synthetic_size=100000000", "data.synthetic_size"),
    ("data.synthetic_size=18", "synthetic_size 18"),  # 10 classes need 2 images each
    ("data.num_classes=1", "data.num_classes"),
    ("data.num_classes=10000000", "data.num_classes"),
    ("data.train_per_class=0", "data.train_per_class"),
    ("data.subset_seed=-1", "data.subset_seed"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.augment.random_crop_padding=100000", "data.augment.random_crop_padding"),
    ("data.augment.rrc_scale=[0.9, 0.1]", "data.augment.rrc_scale"),
    ("data.augment.rrc_scale=[0, 1]", "data.augment.rrc_scale"),
    ("bench.batch_sizes=[0]", "bench.batch_sizes.0"),
    ("bench.batch_sizes=[]", "bench.batch_sizes"),
    ("bench.batch_sizes=[1, -8]", "bench.batch_sizes.1"),
    ("bench.threads=-1", "bench.threads"),
    ("bench.threads=0", "bench.threads"),
    ("bench.threads=100000", "bench.threads"),
    ("bench.warmup=-1", "bench.warmup"),
    ("bench.iters=0", "bench.iters"),
    ("export.parity_images=0", "export.parity_images"),
    ("export.parity_images=100000000", "export.parity_images"),
    ("export.dynamic_batch=1:8:99999999", "export.dynamic_batch"),
    ("export.dynamic_batch=0:8:32", "export.dynamic_batch"),
    ("export.opset=7", "export.opset"),
    ("export.workspace_gib=-1", "export.workspace_gib"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=10000000", "train.epochs"),
    ("train.log_every=0", "train.log_every"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch"),
    ("train.step_size=0", "train.step_size"),
    ("train.step_gamma=0", "train.step_gamma"),
    ("train.momentum=-0.5", "train.momentum"),
    ("train.momentum=1.5", "train.momentum"),
    ("train.lr=0", "train.lr"),
    ("teacher.train.epochs=0", "teacher.train.epochs"),
    ("teacher.train.log_every=-5", "teacher.train.log_every"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("student.std=[0, 1, 1]", "student.std"),
    ("student.mean=[0.5, 0.5]", "student.mean"),
    ("data.root=~nobody_here_xyz/data", "data.root"),
    ("student.weights=~nobody_here_xyz/w.pth", "student.weights"),
]


class TestRanges:
    @pytest.mark.parametrize("override,key", RANGE_CASES, ids=[c[0][:40] for c in RANGE_CASES])
    def test_out_of_range_is_refused_at_validate(self, override, key):
        _refused(load_recipe, SMOKE, [override], match=key)

    def test_batch_memory_bound(self):
        msg = _refused(load_recipe, SMOKE, ["data.batch_size=60000", "data.image_size=512"], match="per float32 batch")
        assert "data.batch_size 60000" in msg and "GiB" in msg
        _refused(load_recipe, SMOKE, ["data.val_batch_size=2000", "teacher.image_size=2048"], match="teacher.image_size")
        _refused(load_recipe, SMOKE, ["bench.batch_sizes=[1, 60000]", "student.image_size=512"], match="bench/export batch")

    def test_in_memory_dataset_bound(self):
        _refused(load_recipe, SMOKE, ["data.dataset=digits", "data.image_size=1024", "data.num_classes=null"],
                 match="digits at image_size 1024")

    def test_upper_bounds_themselves_are_accepted(self):
        r = load_recipe(SMOKE, ["data.image_size=4096", "data.synthetic_size=20", "data.num_classes=10",
                                "data.batch_size=8", "data.val_batch_size=8", "teacher.image_size=32",
                                "student.image_size=32", "bench.threads=1024", "data.num_workers=256"])
        assert r.data.image_size == 4096 and r.bench.threads == 1024

    @pytest.mark.parametrize("given,opt", [({"threads": -1}, "--threads"), ({"threads": 0}, "--threads"),
                                           ({"batch_sizes": [0]}, "--batch-sizes"), ({"batch_sizes": []}, "--batch-sizes"),
                                           ({"iters": 0}, "--iters"), ({"warmup": -2}, "--warmup")])
    def test_bench_command_line_options(self, given, opt):
        _refused(R.bench_options, match=opt, **given)

    def test_bench_options_pass_good_values(self):
        assert R.bench_options(threads=2, batch_sizes=[1, 4], iters=None) == {"threads": 2, "batch_sizes": [1, 4]}


# ----------------------------------------------------------------------------- run folder name


class TestName:
    @pytest.mark.parametrize("name", ["../escaped", "/etc/evil", "a/b", "a\\b", ".hidden", "-rf", "", "with space",
                                      "x" * 300, "x" * 101, "ok\u2028", "caf\u00e9", "..", "."])
    def test_unsafe_names_are_refused(self, name):
        raw = _smoke_raw()
        raw["name"] = name
        _refused(validate_raw, raw, match="name:")

    def test_name_with_nul_byte(self):
        raw = _smoke_raw()
        raw["name"] = "run\x00x"
        _refused(validate_raw, raw, match="name:")

    @pytest.mark.parametrize("name", ["ci_smoke", "vit_s-to.r18", "_private", "1st", "x" * 100])
    def test_safe_names_pass(self, name):
        raw = _smoke_raw()
        raw["name"] = name
        assert validate_raw(raw).name == name

    def test_shipped_recipe_names_are_safe(self):
        for p in sorted(RECIPES.glob("*.yaml")):
            assert R.NAME_RE.fullmatch(load_recipe(p).name)


# ----------------------------------------------------------------------------- timm models


class TestModels:
    def test_unknown_student_model_names_the_closest(self):
        msg = _refused(load_recipe, SMOKE, ["student.model=resnet1800"], match="unknown student.model 'resnet1800'")
        assert "resnet18" in msg.split("closest:")[1]

    def test_unknown_teacher_model(self):
        msg = _refused(load_recipe, SMOKE, ["teacher.model=vit_tiny_patch16_2244"], match="unknown teacher.model")
        assert "vit_tiny_patch16_224" in msg

    @pytest.mark.parametrize("name", ["resnet*", "*", "", "../resnet18", "nothing_like_a_model", "resnet18:x"])
    def test_non_names(self, name):
        _refused(load_recipe, SMOKE, [f"student.model={name}"] if name else ["student.model=''"], match="student.model")

    def test_pretrained_tag_is_accepted(self):
        assert load_recipe(SMOKE, ["student.model=resnet10t.c3_in1k"]).student.model == "resnet10t.c3_in1k"

    def test_local_dir_without_config(self, tmp_path):
        _refused(load_recipe, SMOKE, [f"student.model=local-dir:{tmp_path}"], match="no config.json")

    @pytest.mark.parametrize("override,err", [
        ("teacher.kwargs.patch_size=0", "ZeroDivisionError"),
        ("teacher.kwargs.embed_dim=-5", "negative dimension"),
        ("teacher.kwargs.depth=abc", "TypeError"),
        ("teacher.kwargs.num_heads=3", "divisible by num_heads"),  # embed_dim 64
        ("teacher.kwargs.bogus=1", "unexpected keyword argument 'bogus'"),
        ("teacher.kwargs.img_size=[32]", "IndexError"),
        ("student.kwargs.stem_width=-1", "negative dimension"),
        ("student.kwargs.cardinality=0", "cardinality"),
        ("student.kwargs.output_stride=7", "AssertionError;"),  # timm's assert has no text
        ("student.kwargs.global_pool=nope", "Invalid pool type"),
    ])
    def test_kwargs_timm_rejects_fail_at_validate(self, override, err):
        where = override.split(".")[0]
        msg = _refused(load_recipe, SMOKE, [override], match=f"timm cannot build {where}.model")
        assert err in msg and f"fix {where}.kwargs" in msg

    def test_huge_model_is_refused_before_any_memory(self):
        msg = _refused(load_recipe, SMOKE, ["teacher.kwargs.embed_dim=100000"], match="parameters", max_s=5.0)
        assert "limit 5G" in msg

    @pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "num_classes", "pretrained",
                                     "in_chans", "device", "cache_dir"])
    def test_reserved_kwargs(self, key):
        _refused(load_recipe, SMOKE, [f"student.kwargs.{key}=1"], match=f"kwargs may not set '{key}'")

    def test_create_model_turns_timm_errors_into_bad_input(self):
        # straight to create_model (no validate): the boundary itself refuses
        cfg = TeacherConfig(model="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 0})
        msg = _refused(create_model, cfg, 10, match="timm cannot build teacher.model vit_tiny_patch16_224")
        assert "'patch_size': 0" in msg and "ZeroDivisionError" in msg
        _refused(create_model, StudentConfig(model="resnet1800"), 10, match="closest: resnet18")
        _refused(create_model, StudentConfig(model="resnet10t", kwargs={"nope": 1}), 10, match="unexpected keyword")

    def test_create_model_still_builds_good_models(self):
        m = create_model(StudentConfig(model="resnet10t"), 7).eval()
        assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)

    def test_real_build_failure_after_meta_check_is_bad_input(self):
        # hf-hub names skip the meta check; offline (conftest), the real build fails inside timm/huggingface_hub
        import huggingface_hub.constants

        assert huggingface_hub.constants.HF_HUB_OFFLINE
        with pytest.raises(BadInput) as hub:
            create_model(StudentConfig(model="hf-hub:timm/not-a-repo-xyz"), 10)
        assert "timm cannot build student.model hf-hub:timm/not-a-repo-xyz" in hub.value.message
        with pytest.raises(BadInput) as weights:
            create_model(StudentConfig(model="resnet10t", pretrained=True), 10)
        assert "could not fetch pretrained weights for resnet10t" in weights.value.message


# ----------------------------------------------------------------------------- data sets


def _image_tree(root, spec, size=(12, 10)):
    """spec: {split: {class: n_images}}."""
    from PIL import Image

    for split, classes in spec.items():
        for c, n in classes.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, (40 * i % 255, 0, 0)).save(d / f"{i}.png")


def _folder_cfg(root, **kw):
    return DataConfig(dataset="imagefolder", root=str(root), image_size=8, batch_size=2, val_batch_size=2,
                      num_workers=kw.pop("num_workers", 0), **kw)


class TestImageFolder:
    def test_empty_class_folder(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
        (tmp_path / "train" / "bird").mkdir()
        (tmp_path / "val" / "bird").mkdir()
        msg = _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match="no images")
        assert str(tmp_path / "train" / "bird") in msg

    def test_class_folder_with_only_non_images(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
        (tmp_path / "val" / "dog" / "0.png").unlink()
        (tmp_path / "val" / "dog" / "notes.txt").write_text("not an image")
        msg = _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match="no images")
        assert str(tmp_path / "val" / "dog") in msg

    def test_no_images_at_all(self, tmp_path):
        for split in ("train", "val"):
            (tmp_path / split / "cat").mkdir(parents=True)
        _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match=str(tmp_path / "train" / "cat"))

    def test_images_without_class_folders(self, tmp_path):
        from PIL import Image

        for split in ("train", "val"):
            (tmp_path / split).mkdir()
            Image.new("RGB", (8, 8)).save(tmp_path / split / "0.png")
        _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match="has no class folders")

    def test_class_missing_from_a_split(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2, "eel": 2}, "val": {"cat": 1, "dog": 1, "fox": 1}})
        msg = _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match="class folders differ")
        assert "only in train/: eel" in msg and "only in val/: fox" in msg

    def test_single_class(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 2}, "val": {"cat": 1}})
        _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match="at least 2")

    def test_missing_split(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2}})
        _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match="'val/'")

    def test_fifo_named_like_an_image_is_skipped_not_read(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
        os.mkfifo(tmp_path / "train" / "cat" / "blocked.png")
        d = build_data(_folder_cfg(tmp_path), seed=0, device=CPU)
        assert d.train_size == 4
        (tmp_path / "val" / "dog" / "0.png").unlink()
        os.mkfifo(tmp_path / "val" / "dog" / "0.png")  # the class's only "image" is a FIFO: no images
        _refused(build_data, _folder_cfg(tmp_path), seed=0, device=CPU, match=str(tmp_path / "val" / "dog"), max_s=3)

    @pytest.mark.parametrize("workers", [0, 1])
    def test_undecodable_image_names_the_file(self, tmp_path, workers):
        _image_tree(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 2, "dog": 2}})
        bad = tmp_path / "val" / "dog" / "1.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        d = build_data(_folder_cfg(tmp_path, num_workers=workers), seed=0, device=CPU)
        msg = _refused(lambda: list(d.val), match=str(bad), max_len=700, max_s=30)
        assert "cannot decode image" in msg and "Traceback" not in msg

    def test_fewer_images_than_a_batch_still_trains(self, tmp_path):
        _image_tree(tmp_path, {"train": {"cat": 1, "dog": 2}, "val": {"cat": 1, "dog": 1}})
        d = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, batch_size=64,
                                  num_workers=0), seed=0, device=CPU)
        d.train.set_epoch(0)
        batches = list(d.train)
        assert len(batches) == 1 and batches[0][0].shape == (3, 3, 8, 8)


def _cifar(root, batch: dict | object | bytes, which="test_batch"):
    """A valid CIFAR-10 tree with one batch replaced by ``batch`` (a dict/object pickled, or raw bytes)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        good = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(10)]}
        (base / name).write_bytes(pickle.dumps(good))
    target = base / which
    target.write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch))
    return target


def _good(**over):
    d = {"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


CIFAR_CASES = [
    ([1, 2, 3], "found a list"),
    ("a string", "found a str"),
    (_good(data=None), "no 'data' entry"),
    (_good(labels=None), "no 'labels' entry"),
    (_good(data=np.zeros((4, 3072), dtype=np.float32)), "float32 array"),
    (_good(data=np.zeros((4, 100), dtype=np.uint8)), "shape [4, 100]"),
    (_good(data=np.zeros((4, 3, 32, 32), dtype=np.uint8)), "shape [4, 3, 32, 32]"),
    (_good(data=[[0] * 3072] * 4), "found a list"),
    (_good(labels=[0, 1]), "4 images but 2 labels"),
    (_good(labels=[0, 1, 2, 99]), "labels must lie in [0, 9]"),
    (_good(labels=[0, 1, 2, -1]), "labels must lie in [0, 9]"),
    (_good(labels=["a", "b", "c", "d"]), "list of integers"),
    (_good(labels="0123"), "list of integers"),
    (b"", "cannot read"),
    (b"not a pickle at all", "cannot read"),
    (pickle.dumps(_good())[:50], "cannot read"),
]


class TestCifar:
    @pytest.mark.parametrize("batch,match", CIFAR_CASES, ids=[f"case{i}" for i in range(len(CIFAR_CASES))])
    def test_wrong_structure_names_the_file(self, tmp_path, batch, match):
        target = _cifar(tmp_path, batch)
        msg = _refused(build_data, DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0, device=CPU, match=match)
        assert str(target) in msg

    def test_bytes_keys_and_array_labels_are_read(self, tmp_path):
        data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
        _cifar(tmp_path, {b"data": data, b"labels": np.array([3, 2, 1, 0])})
        d = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_batch_size=4), seed=0, device=CPU)
        _, y = next(iter(d.val))
        assert y.tolist() == [3, 2, 1, 0] and d.val_size == 4 and d.train_size == 50

    def test_batch_file_missing(self, tmp_path):
        target = _cifar(tmp_path, _good())
        target.unlink()
        _refused(build_data, DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0, device=CPU, match=str(target))

    def test_batch_is_a_folder_or_fifo(self, tmp_path):
        target = _cifar(tmp_path, _good(), which="data_batch_3")
        target.unlink()
        os.mkfifo(target)
        _refused(build_data, DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0, device=CPU,
                 match="not a regular file", max_s=3)
        target.unlink()
        target.mkdir()
        _refused(build_data, DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0, device=CPU,
                 match="not a regular file")

    def test_pickle_with_code_still_refused(self, tmp_path):
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        _cifar(tmp_path, Evil())
        _refused(build_data, DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0, device=CPU, match="refusing")

    def test_root_with_unknown_user(self):
        # past validation (which refuses it too), the loader still reports it cleanly
        raw = {**DataConfig().model_dump(), "dataset": "cifar10", "root": "~nobody_here_xyz/c"}
        _refused(build_data, DataConfig.model_construct(**{**raw, "augment": AugmentConfig()}),
                 seed=0, device=CPU, match="data.root")


# ----------------------------------------------------------------------------- the CLI


def _cli_refuses(*args, cwd=None, match=""):
    t = time.perf_counter()
    out = run_cli(*args, cwd=cwd)
    dt = time.perf_counter() - t
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    err = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), out.stderr[-2000:]
    assert match in err[0], err[0]
    assert len(err[0]) < 700
    return err[0], dt


class TestCLI:
    def test_alias_bomb_exit_2(self, tmp_path):
        lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
            f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
        p = _write(tmp_path, _smoke_with_kwargs("\n".join(lines) + "\n"))
        _cli_refuses("validate", str(p), match="refused")

    def test_deep_list_exit_2(self, tmp_path):
        p = _write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
        _cli_refuses("validate", str(p), match="nest")

    def test_huge_wrong_typed_list_short_message(self, tmp_path):
        n = R.MAX_NODES - 200
        p = _write(tmp_path, SMOKE.read_text().replace("seed: 0", "seed: [" + ", ".join(["1"] * n) + "]"))
        _cli_refuses("validate", str(p), match="seed")

    @pytest.mark.parametrize("override,match", [  # the rest of the classes run in-process above
        ("student.model=resnet1800", "closest: resnet18"),
        ("name=../escaped", "name:"),
        ("teacher.kwargs.patch_size=0", "ZeroDivisionError"),
    ])
    def test_validate_refuses(self, override, match):
        _cli_refuses("validate", str(SMOKE), "--set", override, match=match)

    def test_json_document_carries_the_error(self):
        """The real console entry point, in a subprocess: the same exit 2 and document, no traceback."""
        import json

        out = cli("validate", str(SMOKE), "--set", "name=/abs/path", "--json", timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        doc = json.loads(out.stdout)
        assert doc["exit_code"] == 2 and doc["status"] == "error" and "name:" in doc["error"]

    def test_recipe_module_imports_neither_torch_nor_timm(self):
        # the timm check happens inside validation, so `distillctl --help` stays fast
        import subprocess
        import sys

        code = "import sys, distillctl.recipe; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(RECIPES.parent)))
        assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-1000:]
