"""Answer normalisation, vocabularies, soft scores and the VQA score, against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import numpy.testing as npt
import pytest

from feddat_jax import metrics
from feddat_jax.data import answers


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("The Red!", "red"), ("black/white", "black white"), ("2.5", "2.5"), ("1,000", "1000"),
    ("Dont know.", "don't know"), ("  a  Large   CIRCLE ", "large circle"), ("an", ""),
])
def test_normalize_answer(raw, norm):
  assert answers.normalize_answer(raw) == norm
  assert answers.normalize_answer(norm) == norm


def test_build_vocab_counts_all_annotators_and_breaks_ties_alphabetically():
  examples = [{"answers": ["two", "2", "red", "blue"]}, {"answers": ["Blue", "zebra", "apple"]}]
  # counts: 2 -> 2, blue -> 2, red/zebra/apple -> 1
  assert answers.build_vocab(examples, 2) == ["2", "blue"]
  assert answers.build_vocab(examples, 4) == ["2", "blue", "apple", "red"]
  assert answers.build_vocab(list(reversed(examples)), 4) == ["2", "blue", "apple", "red"]


VOCAB = {"red": 0, "blue": 1, "2": 2}
TEN = ["red"] * 4 + ["blue"] * 2 + ["two"] + ["green"] * 3  # "two" normalises to "2"; green not in vocab


def test_soft_scores_vqa():
  npt.assert_allclose(answers.soft_scores(TEN, VOCAB, "vqa", 4), [1.0, 2 / 3, 1 / 3, 0.0], rtol=1e-6)


def test_soft_scores_climb():
  npt.assert_allclose(answers.soft_scores(TEN, VOCAB, "climb", 4), [1.0, 0.6, 0.3, 0.0], rtol=1e-6)
  three = answers.soft_scores(["red"] * 3, VOCAB, "climb", 3)
  npt.assert_allclose(three, [0.9, 0.0, 0.0], rtol=1e-6)


def test_soft_scores_inverse_count():
  npt.assert_allclose(answers.soft_scores(TEN, VOCAB, "inverse_count", 4), [0.25, 0.5, 1.0, 0.0], rtol=1e-6)
  single = answers.soft_scores(["Blue"], VOCAB, "inverse_count", 3)
  assert single.dtype == np.float32
  npt.assert_array_equal(single, [0.0, 1.0, 0.0])


def test_soft_scores_drop_out_of_vocab_and_out_of_range():
  npt.assert_array_equal(answers.soft_scores(["green"] * 10, VOCAB, "vqa", 3), np.zeros(3))
  npt.assert_allclose(answers.soft_scores(["2"] * 3 + ["red"], VOCAB, "vqa", 2), [1 / 3, 0.0], rtol=1e-6)
  with pytest.raises(ValueError):
    answers.soft_scores(["red"], VOCAB, "majority", 3)


LOGITS = np.array([[2.0, 1.0, 0.0, 9.0], [0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 2.0, 0.0]], np.float32)
TARGETS = np.array([[0.3, 1.0, 0.0, 0.0], [0.0, 0.6, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]], np.float32)


def test_vqa_score_by_hand():
  # argmax: 3, 1, 2 -> scores 0.0, 0.6, 1.0.
  assert metrics.vqa_score(LOGITS, TARGETS) == pytest.approx(100 * 1.6 / 3)
  # Answer 3 does not exist: the first example picks answer 0 (score 0.3).
  answer_mask = np.array([1, 1, 1, 0], np.float32)
  assert metrics.vqa_score(LOGITS, TARGETS, answer_mask=answer_mask) == pytest.approx(100 * 1.9 / 3)
  # Padding examples do not count.
  mask = np.array([1, 1, 0], np.float32)
  assert metrics.vqa_score(LOGITS, TARGETS, mask, answer_mask) == pytest.approx(100 * 0.9 / 2)
  # Any leading shape: [C=1, S=3, B=1, A].
  assert metrics.vqa_score(LOGITS[None, :, None], TARGETS[None, :, None], mask[None, :, None],
                           answer_mask) == pytest.approx(45.0)


def test_accuracy_by_hand():
  labels = np.array([3, 2, 2])
  assert metrics.accuracy(LOGITS, labels) == pytest.approx(200 / 3)
  assert metrics.accuracy(LOGITS, labels, np.array([0, 1, 1])) == pytest.approx(50.0)


def test_metrics_with_jax_arrays_and_jit():
  mask = jnp.array([1, 1, 0], jnp.float32)
  answer_mask = jnp.array([1, 1, 1, 0], jnp.float32)
  out = jax.jit(metrics.vqa_score)(jnp.asarray(LOGITS), jnp.asarray(TARGETS), mask, answer_mask)
  assert isinstance(out, jax.Array)
  assert float(out) == pytest.approx(45.0, rel=1e-6)
  assert float(metrics.accuracy(jnp.asarray(LOGITS), jnp.array([3, 2, 2]))) == pytest.approx(200 / 3, rel=1e-6)
  assert metrics.vqa_score(LOGITS, TARGETS, np.zeros(3)) == 0.0  # no real example: 0, not NaN
