"""Fuzzing every way in (issue 12, item 1): random invalid RunConfig fields, TOML files, CLI argvs
and compressor specs. Each must give a clean error: a ValueError raised by qdata's own checks (not
from inside JAX or numpy) with a one-line message naming the field, file or flag, or CLI exit status
2 with one line on stderr; never a hang (each case under a watchdog alarm) and never a silent success.

The invalid values are generated here from the documented rules (DESIGN/--help), not derived from
the checker's own tables, so a check that is removed or loosened shows up as a failing example.
The counts of cases tried and clean are printed at the end (``pytest -s``) and written to the JSON
file ``$QDATA_FUZZ_REPORT`` when that is set.
"""

import argparse
import contextlib
import io
import json
import math
import os
import signal
import string
import tempfile
import tomllib
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qdata
from qdata import cli
from qdata.config import RunConfig, make_compressor, parse_compressor_spec

# Examples: 30 per RunConfig field (and 10 per field in a TOML file), 200 per other entry point.
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FUZZ = settings(max_examples=200, **_SETTINGS)
FIELD_FUZZ = settings(max_examples=30, **_SETTINGS)
TOML_FUZZ = settings(max_examples=10, **_SETTINGS)
COUNTS = {kind: {"tried": 0, "clean": 0} for kind in ("runconfig", "toml", "cli", "compressor_spec")}
QDATA_DIR = str(Path(qdata.__file__).parent)
INT_MAX = 2**31 - 1


@contextlib.contextmanager
def watchdog(seconds: float = 20.0):
    """Fail a case that hangs (SIGALRM; the tests run in the main thread)."""
    def fire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_clean_error(err: BaseException, *named: str) -> None:
    assert isinstance(err, ValueError), f"{type(err).__name__}: {err}"
    message = str(err)
    assert message and "\n" not in message, f"not one line: {message!r}"
    for name in named:
        assert name in message, f"{name!r} not named in {message!r}"
    frame = traceback.extract_tb(err.__traceback__)[-1]
    assert frame.filename.startswith(QDATA_DIR), f"raised from {frame.filename}, not by qdata's checks: {message}"


def expect_value_error(kind: str, call, *named: str) -> None:
    COUNTS[kind]["tried"] += 1
    with watchdog():
        try:
            call()
        except Exception as err:  # noqa: BLE001 - which exception it is, is what the test checks
            assert_clean_error(err, *named)
        else:
            pytest.fail("an invalid input was accepted (silent success)")
    COUNTS[kind]["clean"] += 1


# ----------------------------------------------------------------------------------------------
# Invalid values, field by field, from the documented rules.

junk = st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
text = st.text(alphabet=string.ascii_letters + string.digits + ":.-_ /", max_size=12)


def bad_bool():
    return st.one_of(st.integers(), st.floats(), st.text(max_size=5), junk)


def bad_int(lo: int, hi: int = INT_MAX, optional: bool = False):
    out = [st.integers(max_value=lo - 1), st.integers(min_value=hi + 1, max_value=2**70),
           st.floats(allow_nan=True),  # even 3.0: an integer field takes integers
           st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2)]
    return st.one_of(*out) if optional else st.one_of(*out, st.none())


def bad_float(ok):
    """Numbers outside the range ``ok`` accepts, non-finite numbers, and what is not a number."""
    out_of_range = st.floats(allow_nan=False, allow_infinity=False, width=64).filter(lambda v: not ok(v))
    # Non-finite numbers twice over: the range checks alone let inf through where only a lower bound applies.
    return st.one_of(out_of_range, non_finite, non_finite, st.booleans(), st.text(max_size=5), junk)


def bad_choice(allowed):
    return st.one_of(text.filter(lambda v: v not in allowed), st.integers(), st.booleans(), junk)


def bad_compressor_spec():
    """Malformed specs by the grammar of the --help text: unknown names, missing, zero, negative,
    fractional (>= 1), non-numeric or surplus arguments, error feedback twice."""
    counted = st.sampled_from(["randk", "randk_seed", "topk"])
    bad_count = st.one_of(st.integers(max_value=0).map(str), st.floats(min_value=1.01, max_value=1e6).filter(
        lambda v: v != int(v)).map(repr), st.sampled_from(["", "x", "nan", "inf", "-0.5", "1e400", "0x10", "1:2"]))
    bad_levels = st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["", "x", "2.5", "-3", "1e3"]))
    unknown = text.filter(lambda v: v.split(":")[0] not in
                          {"fp32", "fp16", "randk", "randk_seed", "topk", "qsgd", "qsgd_elias", "terngrad", "sign",
                           "powersgd", "powersgd_allreduce", "ef"})
    plain = st.sampled_from(["fp32", "fp16", "terngrad", "sign"])
    spec = st.one_of(
        unknown,
        counted,  # K missing
        st.tuples(counted, bad_count).map(":".join),
        st.tuples(plain, st.text(max_size=4)).map(":".join),
        st.tuples(st.just("qsgd"), bad_levels).map(":".join),
        st.tuples(st.just("qsgd"), st.integers(1, 8).map(str), bad_levels).map(":".join),
        st.tuples(st.just("qsgd"), st.integers(1, 8).map(str), st.integers(1, 8).map(str), st.text(max_size=3)).map(":".join),
        st.tuples(st.sampled_from(["qsgd_elias", "qsgd"]), st.integers(1, 8).map(str), bad_levels).map(":".join),
        st.tuples(st.sampled_from(["powersgd", "powersgd_allreduce"]), bad_levels).map(":".join),
        st.tuples(st.just("topk"), st.integers(1, 99).map(str), st.text(max_size=3)).map(":".join),
    )
    return st.one_of(spec, spec.map(lambda s: "ef:" + s), st.sampled_from(["ef:ef:topk:10", "ef:", "ef:ef:fp32"]))


def _field_cases():
    """field -> a strategy of its invalid values, and field -> the fields that make it matter."""
    qdata_on = {"method": "qdata"}
    gradient = {"method": "gradient"}
    cases = {
        "name": st.one_of(st.sampled_from(["", " ", "a/b", "x\ny", "tab\t"]), st.integers(), junk),
        "dataset": st.one_of(st.sampled_from(["", "   ", "digits\n"]), st.integers(), st.booleans(), junk),
        "model": st.one_of(text.filter(lambda v: v not in {"logreg", "mlp", "cnn", "resnet20", "resnet18", "resnet18_imagenet"}
                                       and not (v.startswith("mlp:") and all(w.isdigit() and int(w) > 0 for w in v[4:].split("x")))),
                           st.sampled_from(["mlp:", "mlp:0", "mlp:-3", "mlp:12x", "mlp:axb"]), st.integers(), junk),
        "method": bad_choice(("qdata", "sgd", "gradient", "dca", "dispatch", "split")),
        "dca_dim": bad_int(1),
        "dca_anchors": bad_int(1),
        "dca_values": bad_choice(("float32", "float16")),
        "dispatch_replication": bad_int(1),
        "dispatch_balanced": bad_bool(),
        "dispatch_route": bad_choice(("nearest", "vote")),
        "split_mode": bad_choice(("parallel", "sequential")),
        "split_turn": bad_int(1),
        "bits": bad_int(1, 16),
        "quantizer": bad_choice(("stochastic", "nearest", "dither", "per_sample")),
        "gate": bad_choice(("off", "bernoulli", "top")),
        "rho": bad_float(lambda v: 0 < v <= 1),
        "score": bad_choice(("loss", "grad_norm")),
        "gate_floor": bad_float(lambda v: 0 <= v < 1),
        "refine_bits": st.one_of(st.sampled_from([1, -2, 17]), bad_int(0, 16)),
        "refine_max": bad_int(1, 64),
        "correction": st.one_of(bad_compressor_spec().filter(lambda v: v != "off"), st.integers(), junk),
        "cache": bad_bool(),
        "compressor": st.one_of(bad_compressor_spec(), st.integers(), junk),
        "error_feedback": bad_bool(),
        "num_nodes": bad_int(1),
        "partition": st.one_of(st.sampled_from(["dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan",
                                                "dirichlet:inf", "dirichlet:x", "similarity:balanced", "IID"]),
                               text.filter(lambda v: v not in ("iid", "similarity", "similarity:unbalanced")
                                           and not v.startswith("dirichlet:")), st.integers(), junk),
        "stream_start": bad_float(lambda v: 0 < v <= 1),
        "stream_rounds": bad_int(0),
        "batch_size": bad_int(1),
        "rounds": bad_int(1),
        "optimizer": bad_choice(("sgd", "adam")),
        "lr": bad_float(lambda v: v > 0),
        "momentum": bad_float(lambda v: 0 <= v < 1),
        "seed": bad_int(0),
        "target_accuracy": bad_float(lambda v: 0 < v <= 1).filter(lambda v: v is not None),
        "eval_every": bad_int(1),
        "checkpoint_every": bad_int(0),
        "num_devices": bad_int(1),
        "validation": bad_float(lambda v: 0 <= v < 1),
        "max_train": bad_int(1, optional=True),
        "max_test": bad_int(1, optional=True),
        "data_dir": st.one_of(st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=1)),
        "image_size": bad_int(1, optional=True),
    }
    context = {"correction": qdata_on, "gate_floor": {"method": "qdata", "gate": "bernoulli", "rho": 0.5},
               "refine_bits": {"method": "qdata", "cache": True},
               "refine_max": {"method": "qdata", "cache": True, "refine_bits": 2}, "compressor": gradient,
               "error_feedback": gradient, **{f: {"method": "dca"} for f in ("dca_dim", "dca_anchors", "dca_values")},
               **{f: {"method": "dispatch"} for f in ("dispatch_replication", "dispatch_balanced", "dispatch_route")},
               "split_mode": {"method": "split"}, "split_turn": {"method": "split", "split_mode": "sequential"}}
    return cases, context


FIELD_CASES, FIELD_CONTEXT = _field_cases()
FIELDS = sorted(FIELD_CASES)


def bad_field(field=None):
    """(field, invalid value, the keyword arguments that make the field matter); any field, or ``field``."""
    pick = st.just(field) if field else st.sampled_from(FIELDS)
    return pick.flatmap(lambda f: st.tuples(st.just(f), FIELD_CASES[f], st.just(FIELD_CONTEXT.get(f, {}))))


def bad_combination():
    """Fields valid one by one but not together; the message names the field at fault."""
    return st.one_of(
        st.builds(lambda b: ("bits", {"method": "sgd", "bits": b}), st.integers(1, 16).filter(lambda b: b != 4)),
        st.builds(lambda m: ("compressor", {"method": m, "compressor": "topk:10"}), st.sampled_from(["qdata", "sgd"])),
        st.builds(lambda m: ("error_feedback", {"method": m, "error_feedback": True}), st.sampled_from(["qdata", "sgd"])),
        st.builds(lambda m: ("cache", {"method": m, "cache": True}), st.sampled_from(["gradient", "sgd"])),
        st.builds(lambda m: ("momentum", {"optimizer": "adam", "momentum": m}), st.floats(0, 0.99).filter(lambda v: v != 0.9)),
        st.builds(lambda r: ("stream_rounds", {"stream_rounds": r}), st.integers(1, 1000)),
        st.builds(lambda r: ("rho", {"rho": r}), st.floats(0.01, 0.99)),
        st.builds(lambda k: ("checkpoint_every", {"checkpoint_every": k, "eval_every": 10}),
                  st.integers(1, 10**6).filter(lambda k: k % 10)),
        st.builds(lambda s: ("error feedback", {"method": "gradient", "compressor": "ef:" + s, "error_feedback": True}),
                  st.sampled_from(["topk:10", "sign", "randk:0.5", "qsgd:4"])),
        st.just(("score", {"score": "grad_norm"})),
        st.builds(lambda f: ("gate_floor", {"gate_floor": f}), st.floats(0.0, 0.99).filter(lambda v: v != 1e-3)),
        st.builds(lambda k: ("refine_max", {"refine_max": k}), st.integers(2, 64)),
        st.builds(lambda b: ("cache", {"refine_bits": b}), st.integers(2, 16)),
        st.builds(lambda r: ("powersgd_allreduce", {"correction": f"powersgd_allreduce:{r}"}), st.integers(1, 8)),
        st.builds(lambda m, p: ("dispatch_replication", {"method": m, "dispatch_replication": p}),
                  st.sampled_from(["qdata", "sgd", "gradient", "dca"]), st.integers(2, 8)),
        st.builds(lambda n, p: ("dispatch_replication", {"method": "dispatch", "num_nodes": n, "dispatch_replication": p}),
                  st.integers(1, 8), st.integers(9, 100)),
        st.builds(lambda p: ("dispatch_route", {"method": "dispatch", "dispatch_route": "vote", "dispatch_replication": p}),
                  st.just(1)),
        st.builds(lambda m: ("dispatch_balanced", {"method": m, "dispatch_balanced": False}), st.sampled_from(["qdata", "sgd"])),
        # Sequential split learning: its turn needs it, it needs split, and it is built without U-shape or integrity.
        st.builds(lambda k: ("split_turn", {"method": "split", "split_turn": k}), st.integers(2, 1000)),
        st.builds(lambda m: ("split_mode", {"method": m, "split_mode": "sequential"}),
                  st.sampled_from(["qdata", "sgd", "gradient"])),
        st.builds(lambda h: ("split_top", {"method": "split", "split_mode": "sequential", "model": "mlp:8x6x4",
                                           "split_top": h}), st.integers(1, 2)),
        st.just(("integrity", {"method": "split", "split_mode": "sequential", "integrity": True})),
        # A transform code's remaining refusals hold with the coefficient ANS coder as with fixed codes.
        st.builds(lambda t, q, c: ("quantizer", {"transform": t, "sample_bits": 400, "quantizer": q, "coder": c}),
                  st.sampled_from(["dct", "pca"]), st.sampled_from(["nearest", "per_sample"]), st.sampled_from(["fixed", "ans"])),
        st.builds(lambda t, s: ("stream_start", {"transform": t, "sample_bits": 400, "coder": "ans", "stream_start": s}),
                  st.sampled_from(["dct", "pca"]), st.floats(0.05, 0.95)),
        st.builds(lambda b: ("bits", {"transform": "pca", "sample_bits": 400, "coder": "ans", "bits": b}),
                  st.integers(1, 16).filter(lambda b: b != 4)),
    )


@pytest.mark.parametrize("field", FIELDS)
@FIELD_FUZZ
@given(data=st.data())
def test_invalid_field_is_a_clean_value_error(field, data):
    _, value, context = data.draw(bad_field(field))
    expect_value_error("runconfig", lambda: RunConfig(**{**context, field: value}), field)


@FUZZ
@given(bad_combination())
# The probe's findings (issue 12), always among the cases.
@example(("eval_every", {"eval_every": 2.5}))
@example(("cache", {"cache": "no"}))
@example(("error_feedback", {"method": "gradient", "error_feedback": "no"}))
@example(("rounds", {"rounds": 20.5}))
@example(("lr", {"lr": "fast"}))
@example(("lr", {"lr": math.inf}))
@example(("momentum", {"momentum": math.nan}))
@example(("momentum", {"momentum": -1}))
@example(("compressor", {"method": "gradient", "compressor": "topk:0"}))
@example(("compressor", {"method": "gradient", "compressor": "randk:-5"}))
@example(("compressor", {"method": "gradient", "compressor": "ef:ef:topk:10"}))
@example(("compressor", {"method": "qdata", "compressor": "topk:10"}))
def test_invalid_combination_is_a_clean_value_error(case):
    named, kwargs = case
    expect_value_error("runconfig", lambda: RunConfig(**kwargs), named)


# ----------------------------------------------------------------------------------------------
# TOML files.


def toml_value(value):
    """``value`` in TOML syntax, or None where TOML cannot say it (None, dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 2**63 else None  # TOML integers are 64-bit
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        try:  # what a TOML basic string can hold (not every code point can be written)
            tomllib.loads(f"x = {json.dumps(value)}")
        except tomllib.TOMLDecodeError:
            return None
        return json.dumps(value)
    if isinstance(value, list):
        parts = [toml_value(v) for v in value]
        return None if None in parts else "[" + ", ".join(parts) + "]"
    return None


def broken_toml():
    """Documents that are not TOML (each a syntax error) or that set unknown keys."""
    return st.one_of(
        st.sampled_from(["lr = \n", 'lr = "unterminated\n', "[[[\n", "lr = 0.1\nlr = 0.2\n", "= 3\n",
                         "bits = 4 4\n", 'name = "a" "b"\n', "rounds = 1_\n", "lr = .5\n", "[base\n"]),
        st.from_regex(r"\A[a-z]{1,8}_?[a-z]{0,8}\Z", fullmatch=True).filter(
            lambda k: k not in {f for f in RunConfig.__dataclass_fields__}).map(lambda k: f"{k} = 1\n"),
    )


def bad_toml_document(field=None):
    good = st.sampled_from(["# a run\n", ""])
    if field is None:
        return st.tuples(good, broken_toml()).map(lambda t: (None, t[0] + t[1]))
    assignment = bad_field(field).map(lambda t: (t[0], toml_value(t[1]), t[2])).filter(lambda t: t[1] is not None).map(
        lambda t: (t[0], "".join(f"{k} = {json.dumps(v)}\n" for k, v in t[2].items()) + f"{t[0]} = {t[1]}\n"))
    return st.tuples(good, assignment).map(lambda t: (t[1][0], t[0] + t[1][1]))


def _toml_case(named, document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        path.write_text(document)
        expect_value_error("toml", lambda: RunConfig.from_toml(path), str(path), *([named] if named else []))


@pytest.mark.parametrize("field", FIELDS)
@TOML_FUZZ
@given(data=st.data())
def test_invalid_toml_value_is_a_clean_error_naming_the_file(field, data):
    _toml_case(*data.draw(bad_toml_document(field)))


@settings(max_examples=50, **_SETTINGS)
@given(bad_toml_document())
def test_broken_toml_is_a_clean_error_naming_the_file(case):
    _toml_case(*case)


# ----------------------------------------------------------------------------------------------
# Command lines.


def flag(name):
    return "--" + name.replace("_", "-")


def _subparser(command):
    action = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def bad_argv():
    """One invalid flag (a value argparse or RunConfig must refuse), on top of a valid command line."""
    ints = ["bits", "num_nodes", "batch_size", "rounds", "eval_every", "seed", "num_devices", "max_train",
            "max_test", "image_size", "stream_rounds", "checkpoint_every"]
    floats = {"rho": lambda v: 0 < v <= 1, "lr": lambda v: v > 0, "momentum": lambda v: 0 <= v < 1,
              "validation": lambda v: 0 <= v < 1, "stream_start": lambda v: 0 < v <= 1,
              "target_accuracy": lambda v: 0 < v <= 1}
    not_an_int = st.one_of(st.sampled_from(["", "x", "1.5", "1e3", "2.0", "--", "0x10", "one"]),
                           st.floats(allow_nan=True).filter(lambda v: not v.is_integer() if math.isfinite(v) else True).map(repr))
    int_case = st.sampled_from(ints).flatmap(lambda f: st.tuples(st.just(flag(f)), not_an_int))
    out_of_range_int = st.one_of(
        st.tuples(st.sampled_from(["--bits"]), st.sampled_from(["0", "17", "-1", "100"])),
        st.tuples(st.sampled_from(["--num-nodes", "--batch-size", "--rounds", "--eval-every", "--num-devices"]),
                  st.integers(max_value=0).map(str)),
        st.tuples(st.sampled_from(["--seed", "--checkpoint-every"]), st.integers(max_value=-1).map(str)),
    )
    float_case = st.sampled_from(sorted(floats)).flatmap(lambda f: st.tuples(st.just(flag(f)), st.one_of(
        st.sampled_from(["nan", "inf", "-inf", "fast", "", "1,5"]),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not floats[f](v)).map(repr))))
    choices = {"method": ("qdata", "sgd", "gradient"), "quantizer": ("stochastic", "nearest", "dither", "per_sample"),
               "gate": ("off", "bernoulli", "top"), "score": ("loss", "grad_norm"), "optimizer": ("sgd", "adam")}
    choice_case = st.sampled_from(sorted(choices)).flatmap(
        lambda f: st.tuples(st.just(flag(f)), text.filter(lambda v: v not in choices[f] and not v.startswith("-"))))
    spec_case = st.one_of(
        st.tuples(st.just("--compressor"), bad_compressor_spec()).map(lambda t: (*t, "--method", "gradient")),
        st.tuples(st.just("--correction"), bad_compressor_spec().filter(lambda v: v != "off")),
        st.tuples(st.just("--partition"), st.sampled_from(["dirichlet:0", "dirichlet:x", "random", "iid:2"])),
        st.tuples(st.just("--model"), st.sampled_from(["vgg", "mlp:0", "mlp:", "resnet", "MLP"])),
    )
    ignored = st.sampled_from([("--compressor", "topk:10"), ("--error-feedback",), ("--method", "sgd", "--cache"),
                               ("--method", "gradient", "--bits", "8"), ("--optimizer", "adam", "--momentum", "0.5"),
                               ("--gate", "bernoulli", "--method", "sgd"), ("--rho", "0.5"),
                               ("--checkpoint-every", "15", "--eval-every", "10"), ("--stream-rounds", "5")])
    processes = st.one_of(
        st.tuples(st.just("--num-processes"), st.sampled_from(["2", "3"]), st.just("--coordinator"),
                  st.one_of(st.sampled_from(["host", "host:", ":123", "127.0.0.1:0", "127.0.0.1:65536",
                                             "127.0.0.1:x", "127.0.0.1:-1"]))),
        st.tuples(st.just("--num-processes"), st.just("2"), st.just("--process-id"), st.sampled_from(["2", "-1", "7"])),
        st.tuples(st.sampled_from(["--num-processes", "--local-devices"]), st.sampled_from(["-1", "x", "1.5"])),
        st.tuples(st.just("--init-timeout"), st.sampled_from(["0", "-1", "nan", "1000", "x"]),
                  st.just("--num-processes"), st.just("2")),
        st.tuples(st.sampled_from(["--coordinator", "--process-id"]), st.sampled_from(["127.0.0.1:1234", "0"])),
    )
    # argparse takes an unambiguous prefix of an option for the option: those are not unknown
    known = [o for p in ("train", "compare") for o in _subparser(p)._option_string_actions]
    unknown = st.from_regex(r"\A--[a-z]{3,10}\Z", fullmatch=True).filter(
        lambda f: not any(o.startswith(f) for o in known)).map(lambda f: (f, "1"))
    bools = st.tuples(st.sampled_from(["--cache", "--error-feedback", "--resume", "--no-progress"]).map(
        lambda f: f + "=" + "no"))
    return {"int": int_case, "int_range": out_of_range_int, "float": float_case, "choice": choice_case,
            "spec": spec_case, "ignored": ignored, "processes": processes, "unknown": unknown, "bool": bools}


ARGV_CASES = bad_argv()


@pytest.mark.parametrize("kind", sorted(ARGV_CASES))
@settings(max_examples=40, **_SETTINGS)
@given(data=st.data())
def test_invalid_command_line_exits_2_with_one_line(kind, data):
    cli_case(data.draw(ARGV_CASES[kind]), data.draw(st.sampled_from(["train", "compare"])))


@settings(max_examples=1, **_SETTINGS)
@given(st.just(()), st.just("train"))
@example(("--lr", "inf"), "train")
@example(("--momentum", "nan"), "train")
@example(("--momentum", "-1"), "train")
@example(("--compressor", "topk:10", "--method", "qdata"), "train")
@example(("--compressor", "topk:0", "--method", "gradient"), "train")
@example(("--num-processes", "2", "--coordinator", "notahost"), "train")
@example(("--rounds", "20.5"), "train")
def test_the_probes_command_lines_exit_2(argv, command):
    if argv:  # only the explicit examples: the random ones are above
        cli_case(argv, command)


def cli_case(argv, command):
    COUNTS["cli"]["tried"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        err = io.StringIO()
        with watchdog(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main([command, *argv, "--out", str(out), "--no-progress"])
            except SystemExit as exit_:
                code = exit_.code
        said = err.getvalue().strip().splitlines()
        assert code == 2, f"{argv}: exit {code}, {said}"
        assert len(said) == 1 and "Traceback" not in said[0], f"{argv}: {said}"
        assert "error" in said[0]
        assert not out.exists(), f"{argv}: work started before the error"
    COUNTS["cli"]["clean"] += 1


# ----------------------------------------------------------------------------------------------
# Compressor specs, straight into the library.


@FUZZ
@given(st.one_of(bad_compressor_spec().map(lambda s: (s, None)),
                 st.tuples(st.sampled_from(["randk", "randk_seed", "topk"]), st.integers(1, 10**4), st.integers(1, 10**4))
                 .filter(lambda t: t[1] > t[2]).map(lambda t: (f"{t[0]}:{t[1]}", t[2]))))
def test_invalid_compressor_spec_is_a_clean_value_error(case):
    spec, d = case
    if d is None:
        expect_value_error("compressor_spec", lambda: parse_compressor_spec(spec), repr(spec))
    else:  # a valid spec keeping more coordinates than the model has
        expect_value_error("compressor_spec", lambda: make_compressor(spec, d), repr(spec), f"d={d}")


def test_zz_fuzz_counts():
    """The figure to report: how many invalid inputs were tried, and how many were refused cleanly."""
    if any(c["tried"] == 0 for c in COUNTS.values()):
        pytest.skip("run with the whole file: the counts need every entry point")
    tried = sum(c["tried"] for c in COUNTS.values())
    clean = sum(c["clean"] for c in COUNTS.values())
    print(f"\nfuzz: {tried} invalid inputs tried, {clean} refused cleanly: " +
          ", ".join(f"{k} {c['clean']}/{c['tried']}" for k, c in COUNTS.items()))
    if os.environ.get("QDATA_FUZZ_REPORT"):
        Path(os.environ["QDATA_FUZZ_REPORT"]).write_text(json.dumps({"tried": tried, "clean": clean, **COUNTS}, indent=2))
    assert tried >= 1000 and clean == tried
