import pytest

from algorithms.core.classnames import classnames_from_folders, humanize


@pytest.mark.parametrize("folder,name", [
    ("Alarm_Clock", "alarm clock"), ("aircraft_carrier", "aircraft carrier"),
    ("TV", "TV"), ("dog", "dog"), ("half_moon", "half moon"), ("Push-Pin", "push-pin"),
    ("t-shirt", "t-shirt"), ("teddy-bear", "teddy-bear"),
])
def test_humanize(folder, name):
    assert humanize(folder) == name


def test_classnames_follow_label_order():
    assert classnames_from_folders([["Alarm_Clock", "Bike"], ["Alarm_Clock", "Bike"]]) == \
        ["alarm clock", "bike"]


def test_environments_with_different_classes_are_rejected():
    with pytest.raises(ValueError, match="environment 1 has different class folders"):
        classnames_from_folders([["a", "b"], ["a", "c"]], where="/data/X")
