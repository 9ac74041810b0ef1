"""WSD learning-rate values at and around each phase boundary."""

import math

import pytest

from xm2.schedule import WSDSchedule

TOTAL = 100


def factors(schedule: WSDSchedule) -> list[float]:
    return [schedule.lr_factor(step, TOTAL) for step in range(TOTAL)]


def test_warmup_is_linear_and_reaches_the_peak_on_its_last_step():
    schedule = WSDSchedule(warmup_steps=10, decay_start_step=80, decay_style="linear")
    values = factors(schedule)
    assert values[0] == pytest.approx(0.1)
    assert values[4] == pytest.approx(0.5)
    assert values[9] == pytest.approx(1.0)
    assert values[10] == 1.0


def test_stable_phase_is_flat_until_the_decay_start():
    schedule = WSDSchedule(warmup_steps=10, decay_start_step=80, decay_style="linear")
    assert set(factors(schedule)[9:81]) == {1.0}
    assert factors(schedule)[81] < 1.0


@pytest.mark.parametrize(
    "style, at_quarter",
    [("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))), ("1-sqrt", 0.5)],
)
def test_decay_shapes_go_from_peak_to_floor(style, at_quarter):
    schedule = WSDSchedule(warmup_steps=10, decay_start_step=80, decay_style=style,
                           min_lr_ratio=0.1)
    values = factors(schedule)
    assert values[80] == pytest.approx(1.0)
    assert values[85] == pytest.approx(0.1 + 0.9 * at_quarter)
    assert values[99] == pytest.approx(0.1 + 0.9 * schedule_shape_at(style, 19 / 20))
    assert all(a >= b for a, b in zip(values[80:], values[81:], strict=False))
    assert schedule.lr_factor(TOTAL, TOTAL) == pytest.approx(0.1)


def schedule_shape_at(style: str, progress: float) -> float:
    return {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
            "1-sqrt": 1 - math.sqrt(progress)}[style]


def test_exponential_decay_halves_every_half_life():
    schedule = WSDSchedule(warmup_steps=10, decay_start_step=80, decay_style="exponential",
                           half_life_steps=5)
    assert schedule.lr_factor(80, TOTAL) == 1.0
    assert schedule.lr_factor(85, TOTAL) == pytest.approx(0.5)
    assert schedule.lr_factor(90, TOTAL) == pytest.approx(0.25)


def test_exponential_default_half_life_is_a_tenth_of_the_decay():
    schedule = WSDSchedule(warmup_steps=10, decay_start_step=80, decay_style="exponential")
    assert schedule.lr_factor(82, TOTAL) == pytest.approx(0.5)


@pytest.mark.parametrize("decay_start", [100, 150])
def test_decay_start_outside_the_run_is_refused(decay_start):
    schedule = WSDSchedule(warmup_steps=10, decay_start_step=decay_start)
    with pytest.raises(ValueError, match=f"decay_start_step={decay_start} is outside the run"):
        schedule.check_run_length(TOTAL)


def test_decay_start_inside_warmup_is_refused():
    with pytest.raises(ValueError, match="decay_start_step=5 is inside the warmup"):
        WSDSchedule(warmup_steps=10, decay_start_step=5)


def test_a_run_without_max_steps_is_refused():
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        WSDSchedule().check_run_length(-1)
