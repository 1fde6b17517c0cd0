"""Say when something did not work: the source, SHOT and merge checks log a warning with advice."""
import logging

from mergeq.experiments import health


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_source_below_twice_chance_is_a_warning_with_what_to_try(caplog):
    caplog.set_level(logging.INFO, logger="mergeq")
    assert health.check_source(0.52, "Real_World", 5) and not _warnings(caplog)
    assert "source model: 52.0% on the held-out test split of Real_World (5 classes, chance 20.0%)" in caplog.text
    assert not health.check_source(0.39, "Real_World", 5)
    (msg,) = _warnings(caplog)
    assert "did not learn: 39.0%" in msg and "adapt.source.steps" in msg and "data.image_size" in msg


def test_an_expert_worse_than_the_source_is_a_warning(caplog):
    caplog.set_level(logging.INFO, logger="mergeq")
    assert health.check_expert("Art", 0.80, 0.795) and not _warnings(caplog)  # within the 1-point tolerance
    assert not health.check_expert("Art", 0.80, 0.76)
    (msg,) = _warnings(caplog)
    assert msg.startswith("SHOT made the Art expert worse than the source model on Art (76.0% < 80.0%)")


def test_a_merge_far_below_every_expert_is_a_warning(caplog):
    experts = {"a": 0.95, "b": 0.90}
    assert health.check_merged("rtn W3A3", experts, {"a": 0.50, "b": 0.88})  # one hard domain: no warning
    assert not _warnings(caplog)
    assert not health.check_merged("rtn W3A3", experts, {"a": 0.50, "b": 0.60, "hmean": 0.55})
    (msg,) = _warnings(caplog)
    assert msg.startswith("rtn W3A3: the merged model is more than 20 points below every expert")
    assert "a 50.0% vs 95.0%, b 60.0% vs 90.0%" in msg
