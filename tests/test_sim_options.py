"""Options of the wrong kind for simulated tasks and real arms are refused in one line when they are
built, not accepted, truncated or left to fail later with a traceback."""

from __future__ import annotations

import re

import numpy as np
import pytest

from robots.base import RobotError
from robots.registry import make_robot, make_task
from robots.sim.base import SimConfig


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ((64.7, 64), "SimConfig.image_size[0]=64.7 is not a whole number"),  # was cut to (64, 64)
        (("64", "64"), "SimConfig.image_size[0]='64' is not a whole number"),  # was int()-ed
        ((64, float("inf")), "SimConfig.image_size[1]=inf is not a whole number"),  # was an OverflowError
        (64.5, "image_size must be (height, width) of 8 to 4096 pixels, got 64.5"),  # was a TypeError
        (None, "image_size must be (height, width) of 8 to 4096 pixels, got None"),  # was a TypeError
        # MuJoCo's framebuffer or OpenCV failed with a traceback, after wm-collect made the store
        ((100000, 64), "image_size must be (height, width) of 8 to 4096 pixels, got (100000, 64)"),
    ],
)
def test_image_size_of_the_wrong_kind_is_refused_in_one_line(size, words):
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        SimConfig(image_size=size)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(32, (32, 32)), ((48, 64), (48, 64)), ([48, 64], (48, 64)), (np.array([40, 24]), (40, 24))],
)
def test_image_size_of_the_right_kind_is_kept(size, expected):
    got = SimConfig(image_size=size).image_size
    assert got == expected and all(type(s) is int for s in got)


def test_robosuite_env_typo_names_the_nearest_env():
    pytest.importorskip("robosuite")
    for typo in ("Lfit", "lift"):
        with pytest.raises(RobotError, match=r"valid: .*Lift.*; did you mean robosuite/Lift\?$"):
            make_task(f"robosuite/{typo}")


@pytest.mark.parametrize("env_kwargs", [None, [1], "use_latch"])
def test_robosuite_env_kwargs_must_be_a_mapping(env_kwargs):
    """None or a list was a TypeError (a traceback) from the check of the names it holds."""
    pytest.importorskip("robosuite")
    with pytest.raises(RobotError, match=r"^robosuite env_kwargs must be a mapping of robosuite.make arg"):
        make_task("robosuite/Lift", SimConfig(options={"env_kwargs": env_kwargs}))


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"port": 5}, "port must be a non-empty string, got 5"),
        ({"port": ""}, "port must be a non-empty string, got ''"),
        ({"arm_id": ["a"]}, "arm_id must be a non-empty string, got ['a']"),
        ({"calibration_dir": 5}, "calibration_dir must be a path, got 5"),
        ({"cameras": []}, "cameras must be a mapping of camera names to their options, got []"),
        ({"cameras": None}, "cameras must be a mapping of camera names to their options, got None"),
    ],
)
def test_real_arm_options_of_the_wrong_kind_are_refused_in_one_line(options, words):
    """port=5 was built (pyserial refused it at connect); cameras=[] or None was an AttributeError."""
    with pytest.raises(ValueError, match=f"^{re.escape(words)}$"):
        make_robot("so100_follower", **options)


def test_real_arm_numeric_id_is_its_text():
    """`robot_options.arm_id=1` on the command line is an int: the calibration file is still `1.json`."""
    assert make_robot("so100_follower", arm_id=1).options.arm_id == "1"
