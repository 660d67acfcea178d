"""Answer normalisation, vocabularies, soft scores and the per-example VQA score (losses.vqa_scores), against hand
computations."""
import jax
import jax.numpy as jnp
import numpy as np
import numpy.testing as npt
import pytest

from feddat_jax.data import answers
from feddat_jax.models import losses


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
  """The soft target of the argmax answer, per example (callers average over real examples)."""
  # argmax: 3, 1, 2 -> scores 0.0, 0.6, 1.0.
  full = np.ones(4, np.float32)
  npt.assert_allclose(losses.vqa_scores(LOGITS, TARGETS, full), [0.0, 0.6, 1.0], rtol=1e-6)
  # Answer 3 does not exist: the first example picks answer 0 (score 0.3), whatever its logit.
  answer_mask = np.array([1, 1, 1, 0], np.float32)
  npt.assert_allclose(losses.vqa_scores(LOGITS, TARGETS, answer_mask), [0.3, 0.6, 1.0], rtol=1e-6)


def test_vqa_scores_under_jit():
  out = jax.jit(losses.vqa_scores)(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.array([1, 1, 1, 0], jnp.float32))
  assert isinstance(out, jax.Array) and out.shape == (3,)
  npt.assert_allclose(out, [0.3, 0.6, 1.0], rtol=1e-6)
