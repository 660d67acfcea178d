"""Tokenizers and the per-round arrays: exact shapes, dtypes, masks and determinism."""
import numpy as np
import numpy.testing as npt
import pytest

from feddat_jax.data import answers, pipeline, schema, synthetic, tokenizer


# ------------------------------------------------------------------------------------------------ tokenizers


def test_synthetic_tokenizer_specials_padding_truncation_unknown():
  tok = tokenizer.SyntheticTokenizer()
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
      0, 1, 2, 3, 4)
  assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  out = tok(["What color is the star?", "zorblax star"], max_length=9)
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 9)
  assert out["attention_mask"].dtype == np.int32
  npt.assert_array_equal(out["attention_mask"], [[1] * 8 + [0], [1, 1, 1, 1, 0, 0, 0, 0, 0]])
  assert out["input_ids"][0, 0] == tok.cls_token_id and out["input_ids"][0, 7] == tok.sep_token_id
  assert out["input_ids"][0, 8] == tok.pad_token_id
  assert tok.decode(out["input_ids"][0]) == "what color is the star ?"
  assert list(out["input_ids"][1, :4]) == [2, tok.unk_token_id, tok.vocab.index("star"), 3]
  short = tok(["what color is the star?"], max_length=4)["input_ids"][0]
  assert list(short) == [2, tok.vocab.index("what"), tok.vocab.index("color"), 3]


def test_synthetic_tokenizer_knows_every_generated_word():
  tok = tokenizer.SyntheticTokenizer()
  texts = [ex["caption"] for ex in synthetic.caption_corpus(100, seed=0, image_size=16)]
  for name in synthetic.BENCHMARKS:
    for c in synthetic.make_benchmark(name, scale=0.04, image_size=16):
      texts += [ex["question"] for ex in c.train] + [a for ex in c.train for a in ex["answers"]]
  unknown = {w for t in texts for w, i in zip(tok.tokenize(t), tok.encode(t)) if i == tok.unk_token_id}
  assert not unknown


def test_hf_tokenizer_wrapper(tmp_path):
  transformers = pytest.importorskip("transformers")
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "star", "?"]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  # From a local directory: transformers 5 ignores a bare vocab_file argument.
  hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
  tok = tokenizer.HFTokenizer(hf)
  assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.vocab_size) == (
      0, 2, 3, 4, 11)
  out = tok(["What color is the star?", "zorblax"], max_length=6)
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 6)
  npt.assert_array_equal(out["input_ids"], [[2, 5, 6, 7, 8, 3], [2, 1, 3, 0, 0, 0]])
  npt.assert_array_equal(out["attention_mask"], [[1] * 6, [1, 1, 1, 0, 0, 0]])


# ------------------------------------------------------------------------------------------------ images


def test_preprocess_square_is_plain_resize():
  img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  px, mask = pipeline.preprocess_image(img, (32, 32))
  assert px.dtype == np.uint8 and px.shape == (32, 32, 3) and mask.dtype == bool and mask.all()
  same, _ = pipeline.preprocess_image(img, (16, 16))
  npt.assert_array_equal(same, img)


def test_preprocess_keeps_aspect_and_pads_bottom_right():
  wide = np.full((20, 40, 3), 200, np.uint8)  # shorter side 20 -> 32 would make it 64 wide: fit to 16 x 32
  px, mask = pipeline.preprocess_image(wide, (32, 32))
  assert mask[:16].all() and not mask[16:].any()
  assert (px[:16] == 200).all() and (px[16:] == 0).all()
  tall = np.full((60, 30, 3), 9, np.uint8)  # (H, W) = (48, 32): shorter side 30 -> 32, then 64 > 48: fit
  px, mask = pipeline.preprocess_image(tall, (48, 32))
  assert mask.sum(axis=0).max() == 48 and mask.sum(axis=1).max() == 24 and not mask[:, 24:].any()


# ------------------------------------------------------------------------------------------------ rounds


def _client(name, n, num_images, rule, vocab, size=8):
  rng = np.random.default_rng(len(name))
  examples = [dict(question_id=f"{name}{i}", question=f"what color is the star {i}?",
                   images=[rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(num_images)],
                   answers=[vocab[i % len(vocab)]] * (3 if rule == "vqa" else 1) + (["red"] if rule == "vqa" else []))
              for i in range(n)]
  return schema.ClientData(name=name, train=examples, test=examples[: max(1, n // 2)],
                           answers=answers.build_vocab(examples, 10), score_rule=rule, num_images=num_images)


@pytest.fixture()
def data():
  clients = [_client("a", 10, 1, "vqa", ["red", "blue", "green"]),
             _client("b", 3, 2, "inverse_count", ["true", "false"])]
  return pipeline.FederatedData(clients, tokenizer.SyntheticTokenizer(), image_hw=(16, 16), text_len=12,
                                batch_size=4, seed=0)


def test_round_arrays_exact_shapes_dtypes(data):
  batches, step_mask = data.round_batches(0, [0, 1])
  c, s, b, l, n_img, a = 2, 3, 4, 12, 2, 3  # S = ceil(10 / 4); A = max(3 answers, 2 answers)
  expected = {"input_ids": ((c, s, b, l), np.int32), "attention_mask": ((c, s, b, l), np.int32),
              "pixel_values": ((c, s, b, n_img, 16, 16, 3), np.uint8),
              "pixel_mask": ((c, s, b, n_img, 16, 16), np.bool_), "targets": ((c, s, b, a), np.float32),
              "example_mask": ((c, s, b), np.float32)}
  assert set(batches) == set(expected)
  for k, (shape, dtype) in expected.items():
    assert batches[k].shape == shape and batches[k].dtype == dtype, k
  assert step_mask.shape == (c, s) and step_mask.dtype == np.bool_
  npt.assert_array_equal(data.answer_mask, [[1, 1, 1], [1, 1, 0]])
  npt.assert_array_equal(data.num_examples, [10, 3])


def test_round_masks(data):
  batches, step_mask = data.round_batches(0, [0, 1])
  npt.assert_array_equal(step_mask, [[True, True, True], [True, False, False]])
  em = batches["example_mask"]
  npt.assert_array_equal(em[0], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])  # 10 = 4 + 4 + 2
  npt.assert_array_equal(em[1], [[1, 1, 1, 0], [0] * 4, [0] * 4])
  assert not batches["targets"][em == 0].any()
  # Client a has one image: its second image slot is empty everywhere; client b uses both.
  assert not batches["pixel_mask"][0, :, :, 1].any() and not batches["pixel_values"][0, :, :, 1].any()
  assert batches["pixel_mask"][1, 0, :3].all()
  # Each real example of a round appears exactly once per epoch.
  ids = batches["input_ids"][0][em[0] > 0]
  assert len({tuple(r) for r in ids}) == 10


def test_round_targets_are_soft_scores(data):
  batches, _ = data.round_batches(0, [0])
  tok = tokenizer.SyntheticTokenizer()
  assert data.datasets[0].answers == ["red", "blue", "green"]  # red has the extra vote of every example
  em = batches["example_mask"][0] > 0
  for ids, target in zip(batches["input_ids"][0][em], batches["targets"][0][em]):
    i = int(tok.decode(ids).split()[-2])  # "what color is the star {i} ?"
    # Three votes for vocab[i % 3] (score 1) and one for "red" (score 1/3), under the "vqa" rule.
    expected = np.zeros(3, np.float32)
    expected[0] = 1 / 3
    expected[i % 3] = 1.0
    npt.assert_allclose(target, expected, rtol=1e-6)


def test_round_determinism(data):
  b1, _ = data.round_batches(3, [0, 1])
  b2, _ = data.round_batches(3, [0, 1])
  for k in b1:
    npt.assert_array_equal(b1[k], b2[k])
  b3, _ = data.round_batches(4, [0, 1])
  assert not np.array_equal(b1["input_ids"][0], b3["input_ids"][0])
  other = pipeline.FederatedData(data.datasets, tokenizer.SyntheticTokenizer(), image_hw=(16, 16), text_len=12,
                                 batch_size=4, seed=1)
  assert not np.array_equal(other.round_batches(3, [0, 1])[0]["input_ids"][0], b1["input_ids"][0])
  # A client's batches do not depend on which other clients take part.
  npt.assert_array_equal(data.round_batches(3, [0])[0]["input_ids"][0], b1["input_ids"][0])


def test_local_steps_and_epochs(data):
  batches, step_mask = data.round_batches(0, [1, 0], local_steps=5)
  assert step_mask.shape == (2, 5) and step_mask.all() and batches["example_mask"].all()
  assert len({tuple(r) for r in batches["input_ids"][0].reshape(-1, 12)}) == 3  # client b cycled
  _, step_mask = data.round_batches(0, [0, 1], local_epochs=2)
  npt.assert_array_equal(step_mask.sum(axis=1), [5, 2])


def test_eval_batches_in_order(data):
  batches, step_mask = data.eval_batches("test")
  npt.assert_array_equal(step_mask, [[True, True], [True, False]])
  npt.assert_array_equal(batches["example_mask"].sum(axis=(1, 2)), [5, 1])
  tok = tokenizer.SyntheticTokenizer()
  assert tok.decode(batches["input_ids"][0, 1, 0]) == "what color is the star 4 ?"


def test_tokenize_answers():
  tok = tokenizer.SyntheticTokenizer()
  ids = tokenizer.tokenize_answers(tok, ["red", "yes"], num_answers=3, answer_len=4)
  assert ids.shape == (3, 4) and ids.dtype == np.int32
  cls, sep = tok.cls_token_id, tok.sep_token_id
  np.testing.assert_array_equal(ids[:, 0], cls)
  np.testing.assert_array_equal(ids[0], [cls, tok.encode("red")[0], sep, 0])
  np.testing.assert_array_equal(ids[2], [cls, sep, 0, 0])  # an unused slot: answer_mask must be 0 there
  with pytest.raises(ValueError, match="do not fit"):
    tokenizer.tokenize_answers(tok, ["a", "b"], num_answers=1, answer_len=4)


# ------------------------------------------------------------------------------------------------ streaming


@pytest.fixture(scope="module")
def tfds_clients(tmp_path_factory):
  """The synthetic Function benchmark written to array_record by its tfds builder and read back (384 examples)."""
  from feddat_jax.data import builders
  return builders.load_clients("synthetic/function", tmp_path_factory.mktemp("tfds"), scale=0.06, image_size=16)


@pytest.mark.parametrize("image_preprocess,cache_mb", [("square", 0.05), ("vilt", 0)])
def test_streamed_rounds_equal_memory_rounds(tfds_clients, image_preprocess, cache_mb):
  """A Dirichlet population with partial participation: the feeder's rounds and evaluation blocks read from the
  array_record sources by grain's workers (with a cache too small for them: examples dropped and read again)
  are bitwise the rounds cut from the preprocessed in-memory copy."""
  from feddat_jax.federated import feeder, sharding
  kw = dict(image_hw=(32, 32), text_len=12, batch_size=4, num_answers=32, seed=0, population="dirichlet:3:0.5",
            image_preprocess=image_preprocess, size_divisor=16)
  memory = pipeline.FederatedData(tfds_clients, tokenizer.SyntheticTokenizer(), **kw)
  stream = pipeline.FederatedData(tfds_clients, tokenizer.SyntheticTokenizer(), loading="stream", workers=3,
                                  cache_mb=cache_mb, **kw)
  assert not hasattr(stream, "_cache") and stream.num_clients == 15
  assert stream.names == memory.names and stream.image_hw == memory.image_hw
  for a, b in zip(stream.parts, memory.parts):
    npt.assert_array_equal(a.train, b.train)
    npt.assert_array_equal(a.test, b.test)
  feeds = [feeder.Feeder(d, sharding.Placement(), seed=0, cohort_size=4, eval_clients=6) for d in (memory, stream)]
  for r in range(2):
    m, s = (f.host_round(r) for f in feeds)
    npt.assert_array_equal(m.cohort, s.cohort)
    npt.assert_array_equal(m.inputs.step_mask, s.inputs.step_mask)
    assert m.inputs.batches.keys() == s.inputs.batches.keys()
    for k in m.inputs.batches:
      npt.assert_array_equal(s.inputs.batches[k], m.inputs.batches[k], err_msg=k)
  ids = feeds[0].eval_ids(1)
  for (mb, m), (sb, s) in zip(*(f.eval_blocks(ids) for f in feeds)):
    npt.assert_array_equal(mb, sb)
    npt.assert_array_equal(np.asarray(s.step_mask), np.asarray(m.step_mask))
    for k in m.batches:
      npt.assert_array_equal(np.asarray(s.batches[k]), np.asarray(m.batches[k]), err_msg=k)
  assert (0 < stream._lru_bytes <= stream.cache_bytes) if cache_mb else not stream._lru


def test_stream_cache_keeps_examples_for_later_rounds(tfds_clients, monkeypatch):
  data = pipeline.FederatedData(tfds_clients, tokenizer.SyntheticTokenizer(), image_hw=(16, 16), text_len=12,
                                batch_size=4, loading="stream", cache_mb=64)
  reads = []
  encode = data._encode_one
  monkeypatch.setattr(data, "_encode_one", lambda task: reads.append(task) or encode(task))
  first, _ = data.round_batches(0, [1, 3])
  assert len(reads) == len(set(reads)) == data.num_examples[[1, 3]].sum()  # each distinct example read once
  again, _ = data.round_batches(1, [1, 3])  # the same examples reshuffled: all from the cache
  assert len(reads) == data.num_examples[[1, 3]].sum()
  assert not np.array_equal(first["input_ids"], again["input_ids"])


def test_stream_header_reads_answers_and_sizes_without_decoding(tfds_clients):
  train = tfds_clients[0].train
  answers, sizes = train.header(3)
  ex = train[3]
  assert answers == ex["answers"] and sizes == [im.shape[:2] for im in ex["images"]]


def test_streamed_rounds_with_a_wordpiece_tokenizer(tfds_clients, tmp_path):
  """A transformers fast tokenizer (real data's) in grain's threads: the same arrays as in memory."""
  transformers = pytest.importorskip("transformers")
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "shape", "?"]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  tok = tokenizer.HFTokenizer(transformers.BertTokenizerFast.from_pretrained(str(tmp_path)))
  kw = dict(image_hw=(16, 16), text_len=12, batch_size=4, num_answers=32)
  memory = pipeline.FederatedData(tfds_clients, tok, **kw)
  stream = pipeline.FederatedData(tfds_clients, tok, loading="stream", workers=4, **kw)
  (got, got_mask), (want, want_mask) = stream.round_batches(0, [0, 2]), memory.round_batches(0, [0, 2])
  npt.assert_array_equal(got_mask, want_mask)
  for k in want:
    npt.assert_array_equal(got[k], want[k], err_msg=k)
