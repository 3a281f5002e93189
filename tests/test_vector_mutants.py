"""Mutation testing of spec/vectors: every plausible mistake of fisheropt.vectors.mutants
must fail at least one case of its suite (score 100 % per suite), the reference must pass
every case, and every case must kill the mutants it lists in ``kills``, which include the
ones the rules of spec/vectors.md ("Mutants") require of it."""

import functools
import re

import numpy as np
import pytest

import fisheropt as fo
from fisheropt import vectors
from fisheropt.refimpl import RULES
from fisheropt.vectors import mutants as M
from fisheropt.vectors.optim import (
    STEP_MUTANTS,
    RuleVectors,
    case_rule,
    data_tags,
    rule_cases,
    shared_kills,
    theta_moves,
)

SUITES = [s for s in vectors.SUITES if M.mutants(s)]


def _step_matters(suite):
    return case_rule(suite).step_matters


@functools.cache
def _cases(suite):
    return vectors.load_suite(suite)["cases"]


@functools.cache
def _matrix(suite):
    return M.kill_matrix(suite, _cases(suite))


def test_every_suite_has_mutants():
    assert set(SUITES) == set(vectors.SUITES)


@pytest.mark.parametrize("suite", SUITES)
def test_mutation_score_is_100_percent(suite):
    matrix = _matrix(suite)
    survivors = [name for name, by in matrix.items() if not by]
    score = 100 * (len(matrix) - len(survivors)) / len(matrix)
    assert not survivors, f"{suite}: mutation score {score:.0f} %; no case kills {survivors}"


@pytest.mark.parametrize("suite", SUITES)
def test_reference_passes_and_the_unmutated_variant_is_bit_exact(suite):
    """The mutants are one switch away from a re-implementation that gives the reference's
    bits on every case; the reference itself passes every case. (The Fisher suite's
    "re-implementation" is the reference's own functions, whose BLAS results may move in the
    last bits between builds: there, within the case's tolerance.)"""
    reference = fo.backends.get("numpy")
    unmutated = M.UNMUTATED[suite]()
    exact = vectors.tolerance()
    for case in _cases(suite):
        assert M.kills(case, reference) == [], case["name"]
        strict = case if suite == "fisher" else {**case, "tolerance": exact}
        assert M.kills(strict, unmutated) == [], case["name"]


@pytest.mark.parametrize("suite", SUITES)
def test_each_case_kills_the_mutants_it_lists(suite):
    matrix = _matrix(suite)
    missed = [(c["name"], k) for c in _cases(suite) for k in c["kills"] if c["name"] not in matrix.get(k, ())]
    assert not missed, f"{suite}: (case, mutant it should kill but does not): {missed}"


def _theta_moves(case):
    inputs = vectors.decode(case["inputs"])
    return theta_moves(inputs["params"], vectors.decode(case["expected"]), case["tolerance"])


@pytest.mark.parametrize("suite", [s for s in SUITES if s in vectors.OPTIMIZER_SUITES])
def test_optimizer_kills_follow_the_rules(suite):
    """Every resume case kills both step-index mutants (of a rule whose step index matters; a
    rule whose step index does not, Lion, has no such mutants and no case lists them); every case
    with a subnormal value kills flush-to-zero; every case in which θ moves kills never-update-θ;
    the data tags are true."""
    step_matters = _step_matters(suite)
    assert (set(STEP_MUTANTS) <= set(M.mutants(suite))) == step_matters
    assert step_matters or not set(STEP_MUTANTS) & set(M.mutants(suite))
    for case in _cases(suite):
        name, kills, tags = case["name"], set(case["kills"]), set(case["tags"])
        inputs, expected = vectors.decode(case["inputs"]), vectors.decode(case["expected"])
        derived = set(data_tags(inputs, expected))
        assert derived == tags & {"resume", "subnormal", "nonfinite"}, f"{name}: data tags {derived} vs {tags}"
        if "resume" in tags and step_matters:
            assert set(STEP_MUTANTS) <= kills, name
        if not step_matters:
            assert not set(STEP_MUTANTS) & kills, name
        if "subnormal" in tags:
            assert "flush_to_zero" in kills, name
        moves = _theta_moves(case)
        assert moves == ("never_update_theta" in kills), name
        assert moves != ("theta_static" in tags), name


def test_theta_moves_in_every_case_but_the_documented_ones():
    """θ stays put only where the rule says so: zero gradients without weight decay."""
    static = {(s, c["name"]) for s in vectors.OPTIMIZER_SUITES for c in _cases(s) if "theta_static" in c["tags"]}
    assert static == {("adam", "f64_zero_grads_from_step1"), ("adam", "f32_zero_grads_from_step1")}


def test_esimcse_kills_follow_the_rules():
    for case in _cases("esimcse"):
        args, expected = vectors.decode(case["args"]), vectors.decode(case["expected"])
        tags, kills = set(case["tags"]), set(case["kills"])
        assert set(data_tags(args, expected)) == tags & {"subnormal", "nonfinite"}, case["name"]
        if "subnormal" in tags:
            assert "flush_to_zero" in kills, case["name"]
        assert ("targets_static" in tags) != ("targets_unchanged" in kills), case["name"]
        assert ("targets_static" in tags) == (case["args"]["decay"] == 1.0), case["name"]


def _kills(suite, case):
    return set(next(c for c in _cases(suite) if c["name"] == case)["kills"])


def test_the_cases_each_issue_20_complaint_needs_exist():
    """The cases added for mutants nothing else killed (spec/vectors.md, "Mutants")."""
    kills = _kills
    for suite in vectors.OPTIMIZER_SUITES:
        assert "never_update_theta" in kills(suite, "f32_resume_at_step_1000")
        if _step_matters(suite):
            assert {"step_ahead", "step_behind", "never_update_theta"} <= kills(suite, "f32_resume_at_step_1000")
        assert {"flush_to_zero", "never_update_theta"} <= kills(suite, "f32_subnormal_grads")
        assert "never_update_theta" in kills(suite, "f32_huge")
        if case_rule(suite).second_moments:
            assert "square_after_scaling" in kills(suite, "f32_square_overflows")
        else:
            assert "f32_square_overflows" not in {c["name"] for c in _cases(suite)}
    assert {"squares_in_float32", "reduction_in_float32"} <= kills("coupled_adam", "f32_column_mean_needs_float64")
    assert {"squares_in_float32", "reduction_in_float32"} <= kills("fadam", "f32_grad_squares_underflow")
    assert "uncoupled_as_coupled" in kills("coupled_adam", "f32_basic")


def test_lion_cases_kill_the_issue_20_lion_mistakes():
    """Lion (spec/lion.md): sign(0) ≠ 0 and the momentum updated before the sign, plus the
    shared and decay mistakes, each caught by the case written for it, in both dtypes."""
    for short in ("f64", "f32"):
        assert {"sign_of_zero", "decay_not_scaled_by_lr"} <= _kills("lion", f"{short}_zero_grads_from_step1")
        assert {"momentum_before_sign", "betas_swapped", "state_doubled"} <= _kills("lion", f"{short}_basic")
        assert {"decay_after_sign", "decay_not_scaled_by_lr", "decay_coupled"} <= _kills(
            "lion", f"{short}_other_hyperparams"
        )
        assert "flush_to_zero" in _kills("lion", f"{short}_sign_argument_subnormal")
        assert "lerp_form" in _kills("lion", f"{short}_infinite_grads")
        assert "sign_of_nan" in _kills("lion", f"{short}_nan_placement")
    assert "scalars_in_param_dtype" in _kills("lion", "f32_other_hyperparams")
    assert not {"step_ahead", "step_behind"} & set(M.mutants("lion")), "Lion's step index does not enter"


def test_lion_nonfinite_cases_put_inf_and_nan_where_the_spec_says():
    """sign(±Inf) = ±1 keeps θ finite where c = ±Inf (m = ±Inf stays); sign(NaN) = NaN makes θ
    NaN; every other element of those cases stays finite."""
    for short in ("f64", "f32"):
        case = next(c for c in _cases("lion") if c["name"] == f"{short}_infinite_grads")
        last = vectors.decode(case["expected"])[-1]
        assert np.isfinite(last["params"][0]).all()
        assert last["state"]["m"][0][0, 0] == np.inf and last["state"]["m"][0][0, 1] == -np.inf
        assert np.isfinite(last["state"]["m"][0][1:]).all()
        case = next(c for c in _cases("lion") if c["name"] == f"{short}_nan_placement")
        last = vectors.decode(case["expected"])[-1]
        nan = np.zeros((3, 4), bool)
        nan[0, 2] = nan[2, 0] = nan[2, 1] = nan[2, 2] = True
        assert np.array_equal(np.isnan(last["params"][0]), nan) and np.array_equal(np.isnan(last["state"]["m"][0]), nan)
        assert all(np.isfinite(p).all() for p in last["params"][1:])


def test_lion_multiplicative_decay_form_is_tolerated():
    """θ·(1 − αλ) − α·sign(c), the PyTorch ports' form, equals the spec's θ − α(sign(c) + λθ) in
    exact arithmetic and differs by rounding (about an ulp of θ per step): spec/lion.md allows it
    within the tolerances, and the vectors do not reject it."""
    variant = M.lion(M.LionKnobs(decay="multiplicative"))
    assert [c["name"] for c in _cases("lion") if M.kills(c, variant)] == []


def test_step_index_matters_exactly_where_the_rule_has_step_coefficients():
    """The suites find whether the step index enters a rule by running the reference; the
    descriptor says the same through its host coefficients of step t (Lion: none)."""
    for name, rule in RULES.items():
        hp = rule.kernel_kwargs(rule.defaults())
        by_coefficients = any(rule.coefficients(t, **hp) != rule.coefficients(1000, **hp) for t in (1, 2, 999, 1001))
        assert case_rule(name).step_matters == by_coefficients, name
    assert not case_rule("lion").step_matters


@pytest.mark.parametrize("suite", vectors.OPTIMIZER_SUITES)
def test_a_rule_without_entries_gets_a_suite_that_kills_its_shared_mutants(suite):
    """A new rule needs no code in fisheropt/vectors for a suite: with an empty entry (no case or
    mutant of its own) the common cases, derived from its descriptor, are passed by the reference
    and kill every shared mutant that applies, each case the ones it lists."""
    cases = rule_cases(suite, RuleVectors())
    assert [c["name"] for c in cases if M.kills(c, fo.backends.get("numpy"))] == []
    shared = M.shared_optimizer_mutants(suite)
    listed = {k for c in cases for k in c["kills"]}
    assert listed <= set(shared), f"{suite}: kills {listed - set(shared)} are not shared mutants"
    for name, (_, namespace) in shared.items():
        killed_by = {c["name"] for c in cases if M.kills(c, namespace)}
        assert killed_by, f"{suite}: no common case kills {name}"
        missed = [c["name"] for c in cases if name in c["kills"] and c["name"] not in killed_by]
        assert not missed, f"{suite}: {missed} list {name} but do not kill it"
    basic = next(c for c in cases if c["name"] == "f32_basic")
    assert set(shared_kills(case_rule(suite))["basic"]) <= set(basic["kills"])


def test_coupled_flags_are_stored_and_both_kinds_occur():
    for case in _cases("coupled_adam"):
        flags = case["hyperparams"]["coupled"]
        assert len(flags) == len(case["inputs"]["params"]) and True in flags and False in flags, case["name"]
        assert any(p["shape"] and len(p["shape"]) == 2 and not c for p, c in zip(case["inputs"]["params"], flags)), (
            "an uncoupled 2-D tensor"
        )


def test_every_mutant_is_documented():
    text = (vectors.VECTOR_DIR.parent / "vectors.md").read_text(encoding="utf-8")
    for suite in SUITES:
        for name in M.mutants(suite):
            assert re.search(rf"`{name}`", text), f"spec/vectors.md does not describe mutant {name} ({suite})"


def test_a_mutant_that_raises_counts_as_killed():
    case = _cases("adam")[0]

    class Broken:
        @staticmethod
        def adam_step(*args, **kwargs):
            raise ZeroDivisionError("1 - beta1**0")

    assert M.kills(case, Broken) and "ZeroDivisionError" in M.kills(case, Broken)[0]


def test_flush_mutates_only_subnormals():
    a = np.array([1e-45, -1e-40, 1.2e-38, 0.0, np.nan, -np.inf], dtype=np.float32)
    M.flush(a)
    assert a[:2].tolist() == [0.0, 0.0] and a[2] == np.float32(1.2e-38) and np.isnan(a[4]) and a[5] == -np.inf
