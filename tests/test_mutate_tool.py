"""tools/mutate.py's own arithmetic: the sample's interval and the order a mutant's tests run in."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("mutate", Path(__file__).parents[1] / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutate)


def test_wilson_interval_is_the_textbook_value():
    # Wilson (1927) for 8 of 10 at 95%: 0.4902-0.9433 (Newcombe 1998, table I's method 3)
    lo, hi = mutate.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert mutate.wilson(0, 0) == (0.0, 1.0)
    lo, hi = mutate.wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)


def test_a_mutants_tests_run_a_file_at_a_time_the_cheapest_file_first():
    stats = {
        "duration_by_test": {"tests/b.py::t1": 5.0, "tests/a.py::t1": 1.0, "tests/b.py::t2": 0.1,
                             "tests/a.py::t2": 7.0, "tests/c.py::t1": 0.5},
        "tests_by_mangled_function_name": {
            "fdcache.x.x_f": ["tests/a.py::t2", "tests/b.py::t2", "tests/a.py::t1", "tests/b.py::t1"]},
    }
    # b.py costs 5.1 s, a.py 8 s; inside a file, the stats run's order; c.py does not reach f
    assert mutate.covering_tests(stats, "fdcache.x.x_f__mutmut_12") == [
        "tests/b.py::t1", "tests/b.py::t2", "tests/a.py::t1", "tests/a.py::t2"]
    assert mutate.covering_tests(stats, "fdcache.x.x_g__mutmut_1") == []


def test_the_same_seed_draws_the_same_mutants_and_another_seed_others():
    names = [f"fdcache.m.x_f__mutmut_{i}" for i in range(1, 200)] + ["other.x_g__mutmut_1"]
    a = mutate.draw(names, ["fdcache.*"], 20, seed=23)
    assert a == mutate.draw(list(reversed(names)), ["fdcache.*"], 20, seed=23)
    assert a != mutate.draw(names, ["fdcache.*"], 20, seed=24)
    assert len(set(a)) == 20 and all(n.startswith("fdcache.") for n in a)
    with pytest.raises(SystemExit, match="200 mutants asked for, 199 match"):
        mutate.draw(names, ["fdcache.*"], 200, seed=23)
