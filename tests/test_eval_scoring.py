"""`llava eval`'s scoring rules (llavacli.evaluate) on hand-written cases, one rule of LLaVA's at a time."""

from __future__ import annotations

import pytest

from llavacli import evaluate as ev

SHORT = "\nAnswer the question using a single word or phrase."


def colour(answer, qid="c1"):
    return {"question_id": qid, "text": "What color is the star?" + SHORT, "answer": answer, "kind": "colour"}


def count(answer):
    return {"question_id": "n1", "text": "How many shapes are there?" + SHORT, "answer": answer, "kind": "count"}


def choice(answer, n=4):
    return {"question_id": "m1", "text": "...", "answer": answer, "kind": "multiple choice", "choices": ["red", "blue", "green", "purple"][:n]}


def yesno(answer):
    return {"question_id": "y1", "text": "Is there a red star?" + SHORT, "answer": answer, "kind": "yes/no"}


@pytest.mark.parametrize(
    "prediction, answer, correct",
    [
        ("red", "red", True),
        ("Red", "red", True),
        ("Red.", "red", True),
        ("  red \n", "red", True),
        ("the red", "red", True),
        ("red star", "red", False),  # exact match: extra words are wrong
        ("The star is red.", "red", False),
        ("blue", "red", False),
        ("", "red", False),
        ("top left", "top-left", True),  # hyphens are punctuation
    ],
)
def test_short_answers_match_after_normalisation(prediction, answer, correct):
    assert ev.score(colour(answer), prediction).correct is correct


@pytest.mark.parametrize("prediction", ["3", "three", "Three.", "3.", " 3"])
def test_number_words_and_digits_are_the_same_answer(prediction):
    assert ev.score(count("3"), prediction).correct
    assert ev.score(count("three"), prediction).correct


def test_decimal_points_survive_normalisation():
    assert ev.normalize_answer("3.5") == "3.5"
    assert ev.normalize_answer("A cat.") == "cat"
    assert not ev.exact_match("35", "3.5")


def test_short_answer_may_list_several_references():
    record = colour(["gray", "grey"])
    assert ev.score(record, "Grey").correct
    assert not ev.score(record, "silver").correct


@pytest.mark.parametrize(
    "prediction, parsed",
    [
        ("B", "B"),
        (" B ", "B"),
        ("B.", "B"),
        ("B. blue", "B"),
        ("B\nblue", "B"),  # a newline reads as ". "
        ("The answer is B.", "B"),
        ("I think so. The answer is B", "B"),
        ("blue", ev.FAILED),  # the option's text is not its letter
        ("b", ev.FAILED),  # LLaVA's rule is case-sensitive
        ("Bx", ev.FAILED),
        ("B blue", ev.FAILED),
        ("E", ev.FAILED),  # beyond the four choices
        ("The answer is E.", ev.FAILED),
    ],
)
def test_multiple_choice_reads_the_answer_letter(prediction, parsed):
    assert ev.parse_letter(prediction, 4) == parsed
    assert ev.score(choice("B"), prediction).correct is (parsed == "B")


def test_letter_beyond_choices_counts_only_when_choices_allow_it():
    assert ev.parse_letter("C", 2) == ev.FAILED
    assert ev.parse_letter("C", 3) == "C"
    assert ev.score(choice("C", n=2), "C").correct is False


@pytest.mark.parametrize(
    "prediction, parsed",
    [
        ("Yes", "yes"),
        ("yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No.", "no"),
        ("There is not a red star.", "no"),
        ("No, there is no red star in the image.", "no"),
        ("Yes, there is a red star. There is no blue one.", "yes"),  # only the first sentence counts
        ("There is a red star, not a blue one", "no"),  # 'not' anywhere in the first sentence
        ("Nope", "yes"),  # POPE's rule: only the words no/No/not mean no
        ("", "yes"),
    ],
)
def test_yes_no_is_read_pope_style(prediction, parsed):
    assert ev.parse_yes_no(prediction) == parsed


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["yes", "yes", "no", "yes", "no", "no", "no", "yes"]
    m = ev.pope_metrics(labels, preds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_metrics_never_divide_by_zero():
    m = ev.pope_metrics(["no", "no"], ["no", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 1.0


def test_summary_gives_per_kind_accuracy_and_pope_figures():
    records = [colour("red", "c1"), colour("blue", "c2"), count("2"), choice("A"), yesno("yes"), yesno("no")]
    preds = ["red", "green", "two", "A.", "Yes.", "Yes, it is."]
    s = ev.summarize(records, preds)
    assert s["kinds"]["colour"] == {"n": 2, "correct": 1, "accuracy": 0.5, "interval": ev.wilson_interval(1, 2)}
    assert s["kinds"]["count"]["accuracy"] == 1.0
    assert s["kinds"]["multiple choice"]["accuracy"] == 1.0
    assert s["kinds"]["yes/no"]["accuracy"] == 0.5
    assert s["overall"] == {"n": 6, "correct": 4, "accuracy": 4 / 6, "interval": ev.wilson_interval(4, 6)}
    assert s["yes/no"]["yes_ratio"] == 1.0 and s["yes/no"]["recall"] == 1.0 and s["yes/no"]["precision"] == 0.5


def test_summary_refuses_unequal_lengths():
    with pytest.raises(ValueError):
        ev.summarize([colour("red")], [])


def test_explicit_rule_overrides_the_kind():
    record = {"question_id": "x", "answer": "no", "kind": "existence", "rule": "yesno"}
    assert ev.score(record, "No, there is none.").correct
    assert ev.rule_for({"kind": "whatever"}) == ev.EXACT
    with pytest.raises(ValueError):
        ev.rule_for({"rule": "fuzzy"})


def test_record_without_answer_is_an_error():
    with pytest.raises(ValueError):
        ev.score({"question_id": "q", "kind": "colour"}, "red")


def test_chance_levels():
    records = [colour("red"), colour("red"), colour("blue"), colour("green"), yesno("yes"), yesno("no"), choice("A"), choice("B")]
    c = ev.chance(records)
    assert c["colour"]["majority"] == pytest.approx(0.5)
    assert c["colour"]["uniform"] == pytest.approx(1 / 3)
    assert c["yes/no"] == {"majority": 0.5, "uniform": 0.5}
    assert c["multiple choice"]["uniform"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "correct, n, low, high",
    [
        (0, 10, 0.0, 0.2775),  # not the zero-wide interval of p +- z*sqrt(p(1-p)/n) at 0%
        (5, 10, 0.2366, 0.7634),
        (236, 250, 0.9082, 0.9664),  # the demo model's shape: 94.4% does not settle a 95% target either way
        (10, 10, 0.7225, 1.0),
    ],
)
def test_accuracy_comes_with_its_wilson_interval(correct, n, low, high):
    assert ev.wilson_interval(correct, n) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
