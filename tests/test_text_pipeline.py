"""Tests for the text corpora and the BPTT batching of the language-model trainer."""

import functools

import numpy as np
import pytest

from examples import text_pipeline as tp
from tests.helpers import digest

# A small corpus in the PTB files' format: one sentence a line, words split by spaces.
SMALL = {
  'train': [' the cat sat on the mat ', ' the dog sat ', ' a cat ran'],
  'valid': [' the dog ran '],
  'test': [' a mat sat on the cat'],
}


def _write_ptb(directory, splits=SMALL):
  for name, lines in splits.items():
    (directory / f'ptb.{name}.txt').write_text('\n'.join(lines) + '\n')


def test_ptb_is_read_as_the_reference_reads_it(tmp_path):
  _write_ptb(tmp_path)
  corpus = tp.load_corpus('ptb', str(tmp_path))
  # Words numbered in order of first appearance, <eos> after every line.
  assert corpus.vocabulary == ('the', 'cat', 'sat', 'on', 'mat', '<eos>', 'dog', 'a', 'ran')
  words = [corpus.vocabulary[i] for i in corpus.train]
  assert words == [
    'the',
    'cat',
    'sat',
    'on',
    'the',
    'mat',
    '<eos>',
    'the',
    'dog',
    'sat',
    '<eos>',
    'a',
    'cat',
    'ran',
    '<eos>',
  ]
  assert [corpus.vocabulary[i] for i in corpus.valid] == ['the', 'dog', 'ran', '<eos>']
  assert [corpus.vocabulary[i] for i in corpus.split('test')] == (
    ['a', 'mat', 'sat', 'on', 'the', 'cat', '<eos>']
  )
  assert corpus.train.dtype == np.int32
  assert corpus.vocab_size == 9


def test_missing_ptb_files_say_where_to_get_them(tmp_path):
  _write_ptb(tmp_path, {'train': SMALL['train']})
  with pytest.raises(FileNotFoundError, match=r'lacks ptb\.valid\.txt, ptb\.test\.txt') as error:
    tp.load_corpus('ptb', str(tmp_path))
  assert 'simple-examples.tgz' in str(error.value)
  assert 'config.data_dir' in str(error.value)
  with pytest.raises(FileNotFoundError, match=r'config\.data_dir is not set'):
    tp.load_corpus('ptb', None)


def test_unknown_dataset_and_split_are_refused():
  with pytest.raises(ValueError, match="dataset must be one of 'python_docs', 'ptb', got 'wiki'"):
    tp.load_corpus('wiki')
  corpus = tp.tokenize({name: ['a b'] for name in tp.SPLITS})
  with pytest.raises(ValueError, match=r"split must be one of .* got 'dev'"):
    corpus.split('dev')


def test_python_docs_is_real_text_split_without_overlap():
  corpus = tp.load_corpus('python_docs')
  lines = tp.python_docs_lines()
  # About 65,000 words of the Python Language Reference, plus punctuation and <eos>.
  assert len(corpus.train) > 50_000
  assert len(corpus.valid) > 2_000 and len(corpus.test) > 2_000
  assert 1_000 < corpus.vocab_size < 10_000
  assert len(lines['train']) > 15 * len(lines['valid'])
  train_words = {w for line in lines['train'] for w in line.split()}
  # Every word of the held-out splits is a training word or <unk>.
  for name in ('valid', 'test'):
    assert {w for line in lines[name] for w in line.split()} <= train_words | {tp.UNK}
  text = ' '.join(lines['train'][:50])
  assert 'statement' in text and 'expression' in text
  assert '*' * 3 not in text.replace(' ', '')  # no heading underlines
  assert tp.load_corpus('python_docs') is corpus  # read once


def test_batchify_makes_contiguous_streams():
  tokens = np.arange(23)
  streams = tp.batchify(tokens, 4)
  assert streams.shape == (4, 5)
  np.testing.assert_array_equal(streams[1], [5, 6, 7, 8, 9])
  with pytest.raises(ValueError, match='batch_size=12 leaves streams of 1 tokens from 23'):
    tp.batchify(tokens, 12)
  with pytest.raises(ValueError, match='batch_size must be a positive integer, got batch_size=0'):
    tp.batchify(tokens, 0)


def test_bptt_windows_cover_every_target_once():
  streams = tp.batchify(np.arange(30), 3)  # rows of 10: 9 input positions each
  windows = list(tp.bptt_windows(streams, 4))
  assert tp.num_windows(streams, 4) == len(windows) == 3
  for window in windows:
    assert window['inputs'].shape == window['targets'].shape == window['mask'].shape == (3, 4)
  np.testing.assert_array_equal(windows[0]['inputs'][2], [20, 21, 22, 23])
  np.testing.assert_array_equal(windows[0]['targets'][2], [21, 22, 23, 24])
  # The last window holds one real position, then padding with mask 0.
  np.testing.assert_array_equal(windows[2]['mask'][0], [1, 0, 0, 0])
  np.testing.assert_array_equal(windows[2]['targets'][0, :1], [9])
  targets = np.concatenate([w['targets'][w['mask'] == 1] for w in windows])
  expected = np.concatenate([np.arange(1, 10) + 10 * row for row in range(3)])
  np.testing.assert_array_equal(np.sort(targets), np.sort(expected))
  # Part of a pass: the windows start..stop of the whole.
  part = list(tp.bptt_windows(streams, 4, start=1, stop=2))
  assert len(part) == 1
  np.testing.assert_array_equal(part[0]['inputs'], windows[1]['inputs'])
  with pytest.raises(ValueError, match='bptt must be a positive integer, got bptt=0'):
    next(tp.bptt_windows(streams, 0))


def _corpus(tmp_path) -> dict:
  """The arguments that name a corpus of 60 training tokens, in windows of 3."""
  _write_ptb(tmp_path, {**SMALL, 'train': SMALL['train'] * 4})
  return tp.CorpusOptions(dataset='ptb', data_dir=str(tmp_path), bptt=3)


def test_trainer_windows_are_split_over_devices_and_reset_each_pass(tmp_path):
  corpus = _corpus(tmp_path)
  streams = tp.split_streams('ptb', 'train', batch_size=4, data_dir=str(tmp_path))
  assert streams.shape == (4, 15)  # 60 training tokens in 4 streams
  assert tp.steps_per_epoch(corpus, batch_size=4) == tp.num_windows(streams, 3) == 5
  assert tp.steps_per_epoch(corpus, batch_size=4, steps=2) == 2
  windows = list(
    tp.create_input_iter(corpus, 'train', global_batch_size=4, epoch=3, num_local_devices=2)
  )
  assert len(windows) == 5
  expected = list(tp.bptt_windows(streams, 3))
  for window, reference in zip(windows, expected, strict=True):
    assert window['inputs'].shape == (2, 2, 3)  # [devices, streams per device, bptt]
    np.testing.assert_array_equal(window['inputs'].reshape(4, 3), reference['inputs'])
    np.testing.assert_array_equal(window['mask'].reshape(4, 3), reference['mask'])
  assert [float(w['reset'].max()) for w in windows] == [1, 0, 0, 0, 0]
  assert all(w['reset'].min() == w['reset'].max() for w in windows)
  # Resuming inside the epoch yields the rest of the same windows.
  rest = list(
    tp.create_input_iter(corpus, 'train', global_batch_size=4, num_local_devices=2, start_step=3)
  )
  np.testing.assert_array_equal(rest[0]['targets'], windows[3]['targets'])
  assert len(rest) == 2
  # An epoch longer than a pass starts the streams again, from a reset state.
  longer = list(
    tp.create_input_iter(corpus, 'train', global_batch_size=4, num_steps=7, num_local_devices=1)
  )
  assert [float(w['reset'].max()) for w in longer] == [1, 0, 0, 0, 0, 1, 0]
  np.testing.assert_array_equal(longer[5]['inputs'], longer[0]['inputs'])


def test_trainer_evaluation_windows(tmp_path):
  corpus = _corpus(tmp_path)
  # 4 tokens in 2 streams: one window.
  assert tp.steps_per_eval(corpus, 'valid', batch_size=2) == 1
  assert tp.steps_per_eval(corpus, 'valid', batch_size=2, steps=5) == 1
  (window,) = tp.create_input_iter(
    corpus, 'valid', global_batch_size=2, num_steps=1, num_local_devices=1
  )
  assert window['inputs'].shape == (1, 2, 3)
  np.testing.assert_array_equal(window['mask'][0], [[1, 0, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match=r'global_batch_size must be a multiple of the'):
    next(tp.create_input_iter(corpus, 'test', global_batch_size=2, num_local_devices=4))


def test_trainer_windows_are_pinned(tmp_path):
  """The windows of a seeded random corpus, bit for bit as the trainer has read them."""
  rng = np.random.default_rng(0)
  for name, lines in (('train', 120), ('valid', 20), ('test', 20)):
    text = [
      ' '.join(f'w{i}' for i in rng.integers(0, 40, rng.integers(2, 12))) for _ in range(lines)
    ]
    (tmp_path / f'ptb.{name}.txt').write_text('\n'.join(text) + '\n')
  corpus = tp.CorpusOptions(dataset='ptb', data_dir=str(tmp_path), bptt=7)
  windows = functools.partial(tp.create_input_iter, corpus)
  assert tp.steps_per_epoch(corpus, batch_size=8) == 17
  assert tp.steps_per_eval(corpus, 'valid', batch_size=4) == 6
  digests = {
    'train': digest(windows('train', global_batch_size=8, num_local_devices=2)),
    'valid': digest(windows('valid', global_batch_size=4, num_local_devices=1)),
    'train_resumed_longer': digest(
      windows('train', global_batch_size=8, num_steps=25, num_local_devices=1, start_step=3)
    ),
    'test_part': digest(windows('test', global_batch_size=4, num_steps=2, num_local_devices=2)),
  }
  assert digests == {
    'train': '33bbc6b4d6fd69d8',
    'valid': 'f7a38df30b247868',
    'train_resumed_longer': 'ab3193b9b7ae31e8',
    'test_part': 'ed3a78eb593f1d17',
  }
