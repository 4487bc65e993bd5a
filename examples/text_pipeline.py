"""Word-level text corpora for the language-model trainer, batched as the AWD-LSTM reference.

Two corpora:

* ``ptb``: Penn Treebank as Mikolov's `ptb.train.txt`, `ptb.valid.txt` and `ptb.test.txt`
  (10,000 words, already lower-cased with rare words as `<unk>`), read from `data_dir`.
* ``python_docs`` (the offline default): the prose of the Python Language Reference that
  ships with every CPython as `pydoc_data.topics` (the text `help()` shows, about 65,000
  words). It is real English written by people, needs no download and no package beyond
  Python itself. Its paragraphs (without the underlines of headings) are its lines; they
  go, in the order of the topics' names, 18 of every 20 to the training split and one each
  to the validation and test splits. They are lower-cased and
  split into words and punctuation marks, numbers become `N` and words seen fewer than twice
  in the training split become `<unk>`, as in Mikolov's PTB. The text follows the Python
  version, so figures on it are comparable between runs of one Python version.

A corpus is read as the reference's `data.py` does: every line is its words followed by
`<eos>`, and the vocabulary numbers the words in order of first appearance over the
training, validation and test files. `batchify` cuts a split into `batch_size` contiguous
streams (batch first: stream b is row b), dropping the tokens that do not fill a row;
`bptt_windows` walks the streams in windows of `bptt` tokens, each with the next token as
its target. The last window of a split is shorter; it is padded with mask 0 so that every
window has one shape and every real token is counted exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

TEXT_DATASETS = ('python_docs', 'ptb')
SPLITS = ('train', 'valid', 'test')
EOS = '<eos>'
UNK = '<unk>'
PTB_FILES = {split: f'ptb.{split}.txt' for split in SPLITS}
# Mikolov's simple-examples archive holds the files under data/.
PTB_URL = 'http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz'

# python_docs: of every 20 paragraphs, 18 train, then one valid and one test.
_LINE_CYCLE = 20
_WORD = re.compile(r"[a-z_]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*|[^\sa-z_\d]")
# reStructuredText underlines ('*****', '=====') are layout, not text.
_UNDERLINE = re.compile(r'^\s*([^\sa-zA-Z\d])\1{2,}\s*$')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenised corpus.

  Attributes:
    vocabulary: the words, by id.
    train: int32 word ids of the training split, `<eos>` after every line.
    valid: the validation split.
    test: the test split.
  """

  vocabulary: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  def split(self, name: str) -> np.ndarray:
    """The ids of split `name` ('train', 'valid' or 'test')."""
    if name not in SPLITS:
      raise ValueError(f'split must be one of {", ".join(map(repr, SPLITS))}, got {name!r}.')
    return getattr(self, name)


def tokenize(splits: dict[str, Sequence[str]]) -> Corpus:
  """A corpus from the lines of each split, numbered as the reference's `data.Corpus`."""
  ids: dict[str, int] = {}
  arrays = {}
  for name in SPLITS:
    tokens = [
      ids.setdefault(word, len(ids)) for line in splits[name] for word in [*line.split(), EOS]
    ]
    arrays[name] = np.asarray(tokens, np.int32)
  return Corpus(vocabulary=tuple(ids), **arrays)


def _missing_ptb_message(data_dir: str | None, missing: Sequence[str]) -> str:
  where = (
    'config.data_dir is not set' if data_dir is None else f'{data_dir} lacks ' + ', '.join(missing)
  )
  return (
    f'Penn Treebank is not in place: {where}. Download {PTB_URL} on a machine with network '
    'access, unpack it and copy simple-examples/data/ptb.train.txt, ptb.valid.txt and '
    'ptb.test.txt into one directory, then point config.data_dir at it (the '
    'salesforce/awd-lstm-lm getdata.sh fetches the same files).'
  )


def read_ptb(data_dir: str | None) -> Corpus:
  """Penn Treebank from `data_dir`.

  Raises:
    FileNotFoundError: when a file is missing; the message says where to get them.
  """
  paths = {s: os.path.join(data_dir, f) for s, f in PTB_FILES.items()} if data_dir else {}
  missing = [PTB_FILES[s] for s in SPLITS if s not in paths or not os.path.isfile(paths[s])]
  if missing:
    raise FileNotFoundError(_missing_ptb_message(data_dir, missing))
  splits = {}
  for name, path in paths.items():
    with open(path, encoding='utf-8') as f:
      splits[name] = f.read().splitlines()
  return tokenize(splits)


def _words(line: str) -> list[str]:
  return ['N' if word[0].isdigit() else word for word in _WORD.findall(line.lower())]


def python_docs_lines() -> dict[str, list[str]]:
  """The `python_docs` splits as lines of space-separated words, rare words as `<unk>`."""
  from pydoc_data.topics import topics

  # A paragraph (lines up to a blank one) is one line of the corpus, as a sentence is in
  # PTB: the line breaks inside it are only the width of the page.
  lines = [
    ' '.join(words)
    for name in sorted(topics)
    for paragraph in re.split(r'\n\s*\n', topics[name])
    if (words := _words(' '.join(t for t in paragraph.splitlines() if not _UNDERLINE.match(t))))
  ]
  splits: dict[str, list[list[str]]] = {name: [] for name in SPLITS}
  for i, line in enumerate(lines):
    position = i % _LINE_CYCLE
    name = (
      'valid' if position == _LINE_CYCLE - 2 else 'test' if position == _LINE_CYCLE - 1 else 'train'
    )
    splits[name].append(line.split())
  counts = collections.Counter(word for line in splits['train'] for word in line)
  return {
    name: [' '.join(w if counts[w] >= 2 else UNK for w in line) for line in split_lines]
    for name, split_lines in splits.items()
  }


@functools.cache
def _load(dataset: str, data_dir: str | None) -> Corpus:
  if dataset == 'ptb':
    return read_ptb(data_dir)
  return tokenize(python_docs_lines())


def load_corpus(dataset: str, data_dir: str | None = None) -> Corpus:
  """The corpus `dataset` (one of `TEXT_DATASETS`), read once per process.

  Raises:
    ValueError: for an unknown dataset.
    FileNotFoundError: for `ptb` without its files in `data_dir`.
  """
  if dataset not in TEXT_DATASETS:
    raise ValueError(
      f'dataset must be one of {", ".join(map(repr, TEXT_DATASETS))}, got {dataset!r}.'
    )
  return _load(dataset, None if data_dir is None else os.fspath(data_dir))


def batchify(tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """`batch_size` contiguous streams, [batch_size, len(tokens) // batch_size].

  Row b is tokens[b * n : (b + 1) * n]: the reference's `batchify`, batch first.
  """
  if not (isinstance(batch_size, int) and batch_size > 0):
    raise ValueError(f'batch_size must be a positive integer, got batch_size={batch_size!r}.')
  length = len(tokens) // batch_size
  if length < 2:
    raise ValueError(
      f'batch_size={batch_size} leaves streams of {length} tokens from {len(tokens)}; '
      'each stream needs at least 2 (an input and its target).'
    )
  return np.asarray(tokens[: batch_size * length], np.int32).reshape(batch_size, length)


def num_windows(streams: np.ndarray, bptt: int) -> int:
  """Windows in one pass over `streams`: every token but the last of a stream is an input."""
  return -(-(streams.shape[1] - 1) // bptt)


def bptt_windows(
  streams: np.ndarray, bptt: int, *, start: int = 0, stop: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
  """Windows `start` to `stop` (default the last) of one pass over `streams`.

  Window i holds 'inputs' = streams[:, i * bptt : (i + 1) * bptt], 'targets' the same
  shifted by one token, and 'mask' 1 on real tokens, 0 on the padding of the last window.

  Yields:
    dicts of int32 'inputs' and 'targets' and float32 'mask', each [batch, bptt].
  """
  if not (isinstance(bptt, int) and bptt > 0):
    raise ValueError(f'bptt must be a positive integer, got bptt={bptt!r}.')
  batch, length = streams.shape
  stop = num_windows(streams, bptt) if stop is None else stop
  for i in range(start, stop):
    begin = i * bptt
    size = min(bptt, length - 1 - begin)
    inputs = np.zeros((batch, bptt), np.int32)
    targets = np.zeros((batch, bptt), np.int32)
    mask = np.zeros((batch, bptt), np.float32)
    inputs[:, :size] = streams[:, begin : begin + size]
    targets[:, :size] = streams[:, begin + 1 : begin + 1 + size]
    mask[:, :size] = 1.0
    yield {'inputs': inputs, 'targets': targets, 'mask': mask}


# --------------------------------------------------------------------------------------------
# The trainer's view: the same calls as examples.input_pipeline's.


@dataclasses.dataclass(frozen=True)
class CorpusOptions:
  """What reading a corpus depends on, besides the split and the windows asked for.

  Attributes:
    dataset: one of `TEXT_DATASETS`.
    bptt: the tokens of a window.
    data_dir: the directory of the `ptb` files.
  """

  dataset: str
  bptt: int
  data_dir: str | None = None


def split_streams(
  dataset: str, split: str, *, batch_size: int, data_dir: str | None = None
) -> np.ndarray:
  """The `batch_size` streams of `split` of the corpus `dataset` (see `load_corpus`)."""
  return batchify(load_corpus(dataset, data_dir).split(split), batch_size)


def steps_per_epoch(options: CorpusOptions, *, batch_size: int, steps: int | None = -1) -> int:
  """`steps` if positive, else the windows of one pass over 'train' in `batch_size` streams."""
  if steps is not None and steps > 0:
    return steps
  streams = split_streams(
    options.dataset, 'train', batch_size=batch_size, data_dir=options.data_dir
  )
  return num_windows(streams, options.bptt)


def steps_per_eval(
  options: CorpusOptions, split: str, *, batch_size: int, steps: int | None = -1
) -> int:
  """`steps` if positive (and at most a pass), else one pass over `split`."""
  streams = split_streams(options.dataset, split, batch_size=batch_size, data_dir=options.data_dir)
  windows = num_windows(streams, options.bptt)
  return min(steps, windows) if steps is not None and steps > 0 else windows


def create_input_iter(
  options: CorpusOptions,
  split: str,
  *,
  global_batch_size: int,
  epoch: int = 0,
  num_steps: int | None = -1,
  num_local_devices: int | None = None,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the windows of `split`, from window `start_step` on.

  'train' yields `steps_per_epoch` windows (past the end of a pass it starts the
  streams again), the other splits `steps_per_eval`. Every window of every epoch is the
  same; besides 'inputs', 'targets' and 'mask' each carries 'reset', 1 on the first window
  of a pass over the streams, where the reference starts from a zero LSTM state.

  The token ids are an array in memory; the windows are a `grain.MapDataset` over the
  step index, each process cutting its own rows of the streams.

  Args:
    options: the corpus and the window length.
    split: 'train', 'valid' or 'test'.
    global_batch_size: the streams over all processes and devices.
    epoch: unused: the windows do not change from epoch to epoch.
    num_steps: the windows to yield: for 'train' the epoch's (past a pass the streams
      start again), for the other splits at most a pass; -1 or None: one pass.
    num_local_devices: the leading dimension; defaults to `jax.local_device_count()`.
    start_step: the first window to yield (to resume inside an epoch).

  Yields:
    dicts of 'inputs', 'targets' int32, 'mask' float32 [num_local_devices, per_device,
    bptt] and 'reset' float32 [num_local_devices, per_device].

  Raises:
    ValueError: for a `global_batch_size` that the devices do not divide.
  """
  del epoch
  import grain
  import jax

  bptt = options.bptt
  if num_local_devices is None:
    num_local_devices = jax.local_device_count()
  streams = split_streams(
    options.dataset, split, batch_size=global_batch_size, data_dir=options.data_dir
  )
  rows = streams.shape[0]
  num_devices = jax.process_count() * num_local_devices
  if rows % num_devices:
    raise ValueError(
      f'global_batch_size must be a multiple of the device count {num_devices}, got '
      f'global_batch_size={rows}.'
    )
  local = rows // jax.process_count()
  streams = streams[jax.process_index() * local : (jax.process_index() + 1) * local]
  passes = num_windows(streams, bptt)
  if split == 'train':
    stop = steps_per_epoch(options, batch_size=rows, steps=num_steps)
  else:
    stop = steps_per_eval(options, split, batch_size=rows, steps=num_steps)

  def window_at(step: int) -> dict[str, np.ndarray]:
    window = next(bptt_windows(streams, bptt, start=step % passes, stop=step % passes + 1))
    window['reset'] = np.full([local], float(step % passes == 0), np.float32)
    return {k: v.reshape(num_local_devices, -1, *v.shape[1:]) for k, v in window.items()}

  # Windows are cheap slices of memory: read in order, without threads.
  return iter(grain.MapDataset.range(start_step, stop).map(window_at))
