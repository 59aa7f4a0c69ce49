"""Every TensorRT name distillctl/export/trt.py uses exists in the TensorRT version whose code path uses it.

TensorRT cannot run here, so the builder and runner are checked against the real Python API of
TensorRT 10.16.1.11 and 11.4.0.106: the public names their compiled bindings resolve, listed in
tests/data/tensorrt_{10,11}_names.txt by tests/data/tensorrt_names.py (see its docstring and the
files' headers for how).

trt.py is parsed with ``ast`` and walked once per (TensorRT major, precision) scenario by a small
evaluator that follows the code's own version switch: ``_major(trt)`` is the scenario's major,
``precision`` is the scenario's precision, helpers that are a single ``return`` are inlined
(``_strong_typing``), and anything else (file checks, user options) may go either way, so both
branches count. A ``hasattr(trt.X, "Y")`` test may go either way as well (an older 10.x may lack
what 10.16 has), and ``trt.X.Y`` inside the branch it guards needs only exist in some version.
Collected: every ``trt.X[.Y...]`` chain, and every attribute read, set or called on a TensorRT
object, the object's class inferred from where it came from (``trt.Builder(...)`` is a Builder,
``builder.create_network()`` an INetworkDefinition, see RETURNS), ``self.engine`` included.
"""
from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import distillctl.export.trt as trt_module

DATA = Path(__file__).parent / "data"
SOURCE = Path(trt_module.__file__).read_text()
VERSIONS = (10, 11)
PRECISIONS = ("fp32", "fp16", "int8")

# what a TensorRT method returns, for the methods trt.py chains or keeps the result of
RETURNS = {
    ("Builder", "create_network"): "INetworkDefinition",
    ("Builder", "create_builder_config"): "IBuilderConfig",
    ("Builder", "create_optimization_profile"): "IOptimizationProfile",
    ("Builder", "build_serialized_network"): "IHostMemory",
    ("INetworkDefinition", "get_input"): "ITensor",
    ("INetworkDefinition", "get_output"): "ITensor",
    ("IBuilderConfig", "create_timing_cache"): "ITimingCache",
    ("IBuilderConfig", "get_timing_cache"): "ITimingCache",
    ("ITimingCache", "serialize"): "IHostMemory",
    ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
    ("ICudaEngine", "create_execution_context"): "IExecutionContext",
    ("OnnxParser", "get_error"): "IParserError",
}


def load_names(major: int) -> set[str]:
    lines = (DATA / f"tensorrt_{major}_names.txt").read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


NAMES = {v: load_names(v) for v in VERSIONS}
UNKNOWN = object()  # a value the evaluator cannot know: both branches of a test on it are taken


@dataclass(frozen=True)
class Trt:  # the tensorrt module or something reached from it: trt.BuilderFlag.FP16 -> Trt("BuilderFlag.FP16")
    path: str


@dataclass(frozen=True)
class Obj:  # an instance of a TensorRT class
    cls: str


@dataclass(frozen=True)
class Method:  # a bound method of a TensorRT instance
    cls: str
    name: str


def _bool(v):
    if v is UNKNOWN:
        return UNKNOWN
    if isinstance(v, (Trt, Obj, Method)):
        return True
    return bool(v)


@dataclass
class Use:
    name: str  # dotted TensorRT name, e.g. "Builder.create_network"
    line: int
    guarded: bool  # inside the branch of a hasattr() test naming it


@dataclass
class Scenario:
    major: int
    precision: str
    names: set[str]
    uses: list[Use] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)  # "builder" / "self.engine" -> TensorRT class
    overrides: list[tuple[str, str, int]] = field(default_factory=list)  # (base class, method, line)
    hasattr_names: set[str] = field(default_factory=set)


class Walker:
    """Walks trt.py for one scenario, recording every TensorRT name the reachable code touches."""

    def __init__(self, tree: ast.Module, sc: Scenario):
        self.sc = sc
        self.funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.guard: set[str] = set()
        self.tree = tree

    # --- names -------------------------------------------------------------------------------
    def use(self, name: str, node: ast.AST) -> None:
        if name.split(".")[-1].startswith("__") and name != "__version__":
            return  # dunders (ILogger.__init__) exist on every class
        self.sc.uses.append(Use(name, node.lineno, name in self.guard))

    def _hasattr_guards(self, test: ast.AST, env: dict) -> set[str]:
        """Names a test proves present in its true branch: hasattr(trt.X, "Y") alone or inside an and-chain."""
        parts = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
        out = set()
        for p in parts:
            if (isinstance(p, ast.Call) and isinstance(p.func, ast.Name) and p.func.id == "hasattr"
                    and len(p.args) == 2 and isinstance(p.args[1], ast.Constant)):
                base = self.peek(p.args[0], env)
                if isinstance(base, Trt):
                    out.add(f"{base.path}.{p.args[1].value}".lstrip("."))
        return out

    def peek(self, node: ast.AST, env: dict):
        """The value of a pure expression without recording uses (for guards)."""
        if isinstance(node, ast.Name):
            return Trt("") if node.id == "trt" else env.get(node.id, UNKNOWN)
        if isinstance(node, ast.Attribute):
            base = self.peek(node.value, env)
            return Trt(f"{base.path}.{node.attr}".lstrip(".")) if isinstance(base, Trt) else UNKNOWN
        return UNKNOWN

    # --- expressions -------------------------------------------------------------------------
    def ev(self, node: ast.AST | None, env: dict):
        if node is None:
            return None
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "trt":
                return Trt("")
            if node.id in self.sc.types and node.id not in env:
                return Obj(self.sc.types[node.id])
            return env.get(node.id, UNKNOWN)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                key = f"self.{node.attr}"
                return Obj(self.sc.types[key]) if key in self.sc.types else UNKNOWN
            base = self.ev(node.value, env)
            if isinstance(base, Trt):
                path = f"{base.path}.{node.attr}".lstrip(".")
                self.use(path, node)
                # trt.__version__ is a str, trt.ILogger.__init__ a slot: the chain leaves TensorRT's API there
                return UNKNOWN if node.attr.startswith("__") else Trt(path)
            if isinstance(base, Obj):
                self.use(f"{base.cls}.{node.attr}", node)
                return Method(base.cls, node.attr)
            return UNKNOWN
        if isinstance(node, ast.Call):
            return self.call(node, env)
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            result = True if is_and else False
            for v in node.values:
                b = _bool(self.ev(v, env))
                if b is (not is_and):  # False ends an and-chain, True an or-chain: the rest is never evaluated
                    return b
                if b is UNKNOWN:
                    result = UNKNOWN
            return result
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            b = _bool(self.ev(node.operand, env))
            return UNKNOWN if b is UNKNOWN else not b
        if isinstance(node, ast.Compare):
            return self.compare(node, env)
        if isinstance(node, ast.IfExp):
            b = _bool(self.ev(node.test, env))
            if b is UNKNOWN:
                self.ev(node.body, env)
                self.ev(node.orelse, env)
                return UNKNOWN
            return self.ev(node.body if b else node.orelse, env)
        if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
            return tuple(e.value for e in node.elts)
        if isinstance(node, (ast.Lambda, ast.FunctionDef)):
            return UNKNOWN
        for child in ast.iter_child_nodes(node):  # containers, f-strings, arithmetic, subscripts...
            if isinstance(child, ast.expr):
                self.ev(child, env)
            elif isinstance(child, ast.comprehension):
                self.ev(child.iter, env)
                for cond in child.ifs:
                    self.ev(cond, env)
            elif isinstance(child, ast.keyword):
                self.ev(child.value, env)
        return UNKNOWN

    def compare(self, node: ast.Compare, env: dict):
        left = self.ev(node.left, env)
        rights = [self.ev(c, env) for c in node.comparators]
        if len(rights) != 1 or left is UNKNOWN or rights[0] is UNKNOWN:
            return UNKNOWN
        a, b, op = left, rights[0], node.ops[0]
        if any(isinstance(x, (Trt, Obj, Method)) for x in (a, b)):
            return UNKNOWN
        table = {ast.Eq: lambda: a == b, ast.NotEq: lambda: a != b, ast.Lt: lambda: a < b, ast.LtE: lambda: a <= b,
                 ast.Gt: lambda: a > b, ast.GtE: lambda: a >= b, ast.In: lambda: a in b, ast.NotIn: lambda: a not in b,
                 ast.Is: lambda: a is b, ast.IsNot: lambda: a is not b}
        try:
            return table[type(op)]()
        except (KeyError, TypeError):
            return UNKNOWN

    def call(self, node: ast.Call, env: dict):
        f = node.func
        if isinstance(f, ast.Name) and f.id == "hasattr" and len(node.args) == 2:
            base = self.ev(node.args[0], env)
            self.ev(node.args[1], env)
            if isinstance(base, Trt) and isinstance(node.args[1], ast.Constant):
                self.sc.hasattr_names.add(f"{base.path}.{node.args[1].value}".lstrip("."))
            return UNKNOWN  # an older minor release may lack what the listed one has
        if isinstance(f, ast.Name) and f.id == "_major":
            return self.sc.major  # the code's version switch
        if isinstance(f, ast.Name) and f.id == "require":
            for a in node.args:
                self.ev(a, env)
            return Trt("")
        args = [self.ev(a, env) for a in node.args]
        for k in node.keywords:
            self.ev(k.value, env)
        if isinstance(f, ast.Name) and f.id in self.funcs:
            fn = self.funcs[f.id]
            body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Return):  # a one-line predicate: inline it
                inner = {p.arg: v for p, v in zip(fn.args.args, args)}
                return self.ev(body[0].value, inner)
            return UNKNOWN
        callee = self.ev(f, env)
        if isinstance(callee, Trt) and callee.path and callee.path.split(".")[-1][:1].isupper():
            return Obj(callee.path.split(".")[-1])  # trt.Builder(logger) -> a Builder
        if isinstance(callee, Method):
            cls = RETURNS.get((callee.cls, callee.name))
            return Obj(cls) if cls else UNKNOWN
        return UNKNOWN

    # --- statements --------------------------------------------------------------------------
    def bind(self, target: ast.AST, value, env: dict) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
            if isinstance(value, Obj):
                self.sc.types[target.id] = value.cls
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            if isinstance(value, Obj):
                self.sc.types[f"self.{target.attr}"] = value.cls
        elif isinstance(target, ast.Attribute):
            self.ev(target, env)  # config.builder_optimization_level = ...: the property must exist
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self.bind(t, UNKNOWN, env)
        else:
            self.ev(target, env)

    def block(self, stmts: list[ast.stmt], env: dict) -> None:
        for s in stmts:
            self.stmt(s, env)

    def branch(self, stmts: list[ast.stmt], env: dict, guards: set[str]) -> dict:
        inner, saved = dict(env), self.guard
        self.guard = saved | guards
        self.block(stmts, inner)
        self.guard = saved
        return inner

    @staticmethod
    def merge(env: dict, *branches: dict) -> None:
        for key in set().union(*branches):
            vals = [b.get(key, UNKNOWN) for b in branches]
            env[key] = vals[0] if all(v == vals[0] for v in vals) else UNKNOWN

    def stmt(self, s: ast.stmt, env: dict) -> None:
        if isinstance(s, ast.If):
            b = _bool(self.ev(s.test, env))
            guards = self._hasattr_guards(s.test, env)
            if b is UNKNOWN:
                self.merge(env, self.branch(s.body, env, guards), self.branch(s.orelse, env, set()))
            else:
                self.merge(env, self.branch(s.body if b else s.orelse, env, guards if b else set()))
        elif isinstance(s, ast.Assign):
            v = self.ev(s.value, env)
            for t in s.targets:
                self.bind(t, v, env)
        elif isinstance(s, (ast.AugAssign, ast.AnnAssign)):
            self.ev(s.value, env)
            self.bind(s.target, UNKNOWN, env)
        elif isinstance(s, (ast.For, ast.While)):
            self.ev(s.iter if isinstance(s, ast.For) else s.test, env)
            inner = dict(env)
            if isinstance(s, ast.For):
                self.bind(s.target, UNKNOWN, inner)
            self.block(s.body, inner)
            self.block(s.orelse, inner)
            self.merge(env, env, inner)
        elif isinstance(s, ast.Try):
            parts = [s.body, s.orelse, s.finalbody] + [h.body for h in s.handlers]
            self.merge(env, env, *[self.branch(p, env, set()) for p in parts])
        elif isinstance(s, ast.With):
            for item in s.items:
                self.ev(item.context_expr, env)
            self.block(s.body, env)
        elif isinstance(s, ast.FunctionDef):  # nested helpers run later in the same scenario
            self.block(s.body, dict(env))
        elif isinstance(s, ast.ClassDef):
            self.classdef(s, env)
        elif isinstance(s, (ast.Return, ast.Expr)):
            self.ev(s.value, env)
        elif isinstance(s, ast.Raise):
            self.ev(s.exc, env)
        elif isinstance(s, (ast.Import, ast.ImportFrom, ast.Pass, ast.Global, ast.Nonlocal, ast.Break, ast.Continue)):
            pass
        else:
            raise AssertionError(f"test_trt_api cannot walk {type(s).__name__} at line {s.lineno}; teach it")

    def classdef(self, c: ast.ClassDef, env: dict) -> None:
        bases = [self.ev(b, env) for b in c.bases]
        trt_bases = [b.path.split(".")[-1] for b in bases if isinstance(b, Trt)]
        for item in c.body:
            if isinstance(item, ast.FunctionDef):
                for base in trt_bases:  # an override TensorRT calls must carry the base's method name
                    if not item.name.startswith("__"):
                        self.sc.overrides.append((base, item.name, item.lineno))
                self.block(item.body, dict(env))  # methods in source order: __init__ first sets self.* types
            else:
                self.stmt(item, env)

    def run(self) -> Scenario:
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef):
                env = {a.arg: UNKNOWN for a in node.args.args + node.args.kwonlyargs}
                if "precision" in env:
                    env["precision"] = self.sc.precision
                self.block(node.body, env)
            elif isinstance(node, ast.ClassDef):
                self.classdef(node, {})
        return self.sc


def scan(source: str) -> list[Scenario]:
    tree = ast.parse(source)
    return [Walker(tree, Scenario(v, p, NAMES[v])).run() for v, p in itertools.product(VERSIONS, PRECISIONS)]


def violations(scenarios: list[Scenario]) -> list[str]:
    out = []
    everywhere = NAMES[10] | NAMES[11]
    for sc in scenarios:
        for u in sc.uses:
            if u.name in sc.names:
                continue
            if u.guarded and u.name in everywhere:
                continue  # behind hasattr(): must exist somewhere, not in every version
            out.append(f"line {u.line}: {u.name} is used on the TensorRT {sc.major} path "
                       f"(precision {sc.precision}) but TensorRT {sc.major} has no such name")
        for base, meth, line in sc.overrides:
            if f"{base}.{meth}" not in sc.names:
                out.append(f"line {line}: {meth} overrides nothing in TensorRT {sc.major}'s {base}")
        for name in sc.hasattr_names - everywhere:
            out.append(f"hasattr(..., {name!r}) tests a name no TensorRT version has")
    return sorted(set(out))


@pytest.fixture(scope="module")
def scenarios():
    return scan(SOURCE)


def test_name_lists_are_the_real_apis():
    """The lists hold the two APIs and their documented differences (deploy-notes C.1), not a guess."""
    for v in VERSIONS:
        header = (DATA / f"tensorrt_{v}_names.txt").read_text().splitlines()[:8]
        assert any(f"tensorrt-cu12-bindings=={v}." in ln for ln in header), header
        assert {"Builder.build_serialized_network", "IExecutionContext.execute_async_v3",
                "IBuilderConfig.set_memory_pool_limit", "ILogger.Severity.ERROR"} <= NAMES[v]
        assert not {"Builder.build_engine", "IExecutionContext.execute_async_v2",
                    "IBuilderConfig.max_workspace_size"} & NAMES[v]  # removed in 10
        assert len(NAMES[v]) > 1500
    only10 = NAMES[10] - NAMES[11]
    assert {"BuilderFlag.FP16", "BuilderFlag.INT8", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
            "IBuilderConfig.int8_calibrator", "ICudaEngine.device_memory_size"} <= only10
    assert "ICudaEngine.device_memory_size_v2" in NAMES[11]


def test_every_tensorrt_name_in_trt_py_exists_where_it_is_used(scenarios):
    assert violations(scenarios) == []


def test_the_walk_reaches_every_tensorrt_object(scenarios):
    """Guard against a vacuous pass: the builder, runner and all their objects were seen and typed."""
    used = {u.name for sc in scenarios for u in sc.uses}
    typed = set().union(*(sc.types for sc in scenarios))
    assert {"builder", "network", "parser", "config", "profile", "inp", "self.runtime", "self.engine",
            "self.ctx"} <= typed
    assert {"Builder.create_network", "Builder.build_serialized_network", "OnnxParser.parse_from_file",
            "OnnxParser.num_errors", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.builder_optimization_level",
            "IBuilderConfig.set_flag", "IOptimizationProfile.set_shape", "ITensor.shape", "ITimingCache.serialize",
            "ICudaEngine.get_tensor_profile_shape", "IExecutionContext.execute_async_v3",
            "IExecutionContext.set_tensor_address", "Runtime.deserialize_cuda_engine", "TensorIOMode.INPUT",
            "ILogger.Severity.VERBOSE", "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "MemoryPoolType.WORKSPACE",
            "BuilderFlag.FP16", "BuilderFlag.INT8"} <= used
    assert ("ILogger", "log") in {(b, m) for sc in scenarios for b, m, _ in sc.overrides}


def test_version_switch_paths(scenarios):
    """Which names each path really reaches: weak-typing flags only on 10, INT8 only for int8."""
    by = {(sc.major, sc.precision): {u.name for u in sc.uses} for sc in scenarios}
    assert "BuilderFlag.FP16" in by[10, "fp16"] and "BuilderFlag.FP16" not in by[11, "fp16"]
    assert "BuilderFlag.INT8" in by[10, "int8"] and "BuilderFlag.INT8" not in by[11, "int8"]
    assert not {"BuilderFlag.FP16", "BuilderFlag.INT8"} & (by[10, "fp32"] | by[11, "fp32"])
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in by[10, "int8"]
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" not in by[11, "int8"]  # 11 is always strongly typed
    assert not any("int8_calibrator" in n or "calibration_profile" in n for n in set().union(*by.values()))


def test_dtype_table_names_exist():
    """_torch_dtype looks DataType members up by name behind hasattr: each key must exist in 10 or 11."""
    fn = next(n for n in ast.parse(SOURCE).body if isinstance(n, ast.FunctionDef) and n.name == "_torch_dtype")
    table = next(n.value for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict))
    keys = [k.value for k in table.keys]
    assert {"FLOAT", "HALF", "INT8"} <= set(keys)
    for k in keys:
        assert f"DataType.{k}" in NAMES[10] | NAMES[11], k


@pytest.mark.parametrize("old,new,expected", [
    ("build_serialized_network", "build_engine", r"Builder\.build_engine is used on the TensorRT 10 path"),
    ("execute_async_v3", "execute_async_v2", r"execute_async_v2 is used on the TensorRT 11 path"),
    ('if precision == "fp16" and not strongly_typed:', 'if precision == "fp16":',
     r"BuilderFlag\.FP16 is used on the TensorRT 11 path \(precision fp16\)"),
    ('if precision == "int8" and not strongly_typed:', 'if precision == "int8":',
     r"BuilderFlag\.INT8 is used on the TensorRT 11 path \(precision int8\)"),
    ("get_tensor_profile_shape", "get_profile_shape", r"ICudaEngine\.get_profile_shape"),
    ("config.builder_optimization_level = opt_level", "config.max_workspace_size = opt_level",
     r"IBuilderConfig\.max_workspace_size"),
    ("def log(self, severity, msg):", "def write(self, severity, msg):", r"write overrides nothing"),
])
def test_the_check_fails_on_real_mistakes(old, new, expected):
    """Each edit is an API mistake TensorRT 10/11 would raise on; the checker must name it."""
    assert old in SOURCE
    found = violations(scan(SOURCE.replace(old, new)))
    assert any(re.search(expected, v) for v in found), found
