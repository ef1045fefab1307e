"""Which KV-cache pages are free, which rows hold them, and the prefix cache over them.

A prompt's full pages are its blocks of `page_size` tokens. Once a prompt is prefilled, each of
its full blocks is registered under a key that names the block's tokens and every token before
it (the key of the previous block and this block's tokens), so a later prompt that starts with
the same tokens (a persona's system prompt, an annotation prompt's instructions and materials)
finds the pages that already hold their keys and values and shares them instead of recomputing
them. A page is shared by reference count; a cached page no row holds stays in the cache until
its memory is needed, evicted least recently used first.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from persllm_jax.inference.paged_forward import SCRATCH_PAGE


class OutOfPages(Exception):
    """Not enough free (or evictable) pages for a request now."""


@dataclasses.dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one cached page
    tokens_saved: int = 0  # prompt tokens whose keys and values came from the cache
    evictions: int = 0  # cached pages given to other rows

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class PagePool:
    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self._free = collections.deque(p for p in range(num_pages) if p != SCRATCH_PAGE)
        self._refs = [0] * num_pages
        self._page_of: dict[tuple, int] = {}  # block key -> page holding it
        self._key_of: dict[int, tuple] = {}  # page -> its block key
        self._idle = collections.OrderedDict()  # cached pages no row holds, least recent first
        self.stats = PrefixStats()

    @property
    def capacity(self) -> int:
        """Pages a single row could ever hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def available(self) -> int:
        return len(self._free) + len(self._idle)

    def _block_keys(self, tokens: Sequence[int], blocks: int):
        key: tuple = ()
        for i in range(blocks):
            block = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
            key = (hash(key), block)
            yield key

    def acquire(self, prompt: Sequence[int], total_tokens: int) -> tuple[list[int], int]:
        """Pages for a row that will hold `total_tokens` tokens, of which `prompt` comes first:
        the cached pages of the prompt's leading full blocks (at most all but its last token: the
        row must compute at least one token to get logits), then fresh ones. Returns (pages,
        number of prompt tokens already cached). Raises OutOfPages, holding nothing, when the
        pool cannot give them now."""
        needed = -(-total_tokens // self.page_size)
        shared = self._cached_pages(prompt)
        if needed - len(shared) > self.available - sum(1 for p in shared if p in self._idle):
            raise OutOfPages(f"needs {needed - len(shared)} pages, {self.available} available")
        for page in shared:
            self._idle.pop(page, None)
            self._refs[page] += 1
        fresh = [self._take() for _ in range(needed - len(shared))]
        self.stats.lookups += 1
        if shared:
            self.stats.hits += 1
            self.stats.tokens_saved += len(shared) * self.page_size
        return shared + fresh, len(shared) * self.page_size

    def _cached_pages(self, prompt: Sequence[int]) -> list[int]:
        """The cached pages of the prompt's leading full blocks, all but its last token's."""
        shared: list[int] = []
        if self.prefix_cache:
            for key in self._block_keys(prompt, (len(prompt) - 1) // self.page_size):
                page = self._page_of.get(key)
                if page is None:
                    break
                shared.append(page)
        return shared

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """How many of the prompt's tokens `acquire` would find cached now."""
        return len(self._cached_pages(prompt)) * self.page_size

    def _take(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            self.stats.evictions += 1
        self._refs[page] = 1
        return page

    def register(self, prompt: Sequence[int], pages: Sequence[int]) -> None:
        """Offer a prefilled prompt's full blocks to the prefix cache."""
        if not self.prefix_cache:
            return
        for key, page in zip(self._block_keys(prompt, len(prompt) // self.page_size), pages):
            if key not in self._page_of and page not in self._key_of:
                self._page_of[key] = page
                self._key_of[page] = key

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (the model changed); only when no row holds a page."""
        assert not any(self._refs), "rows still hold pages"
        self._free.extend(self._idle)
        self._idle.clear()
        self._page_of.clear()
        self._key_of.clear()

    def release(self, pages: Sequence[int]) -> None:
        # last block first: of a row's cached blocks, the later ones are evicted first (a block is
        # of no use once a block before it is gone)
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._idle[page] = None  # most recently used last
                else:
                    self._free.append(page)
