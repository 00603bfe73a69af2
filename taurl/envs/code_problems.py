"""The built-in problems of ``taurl/Code-v0``: 49 functions to write, in four families.

Splits differ in kind, not only in seed: ``train`` holds the ``strings`` and ``lists``
families, ``heldout`` the ``numbers`` (number theory) and ``grids`` families, so
held-out success measures transfer to problems of another sort.

Each problem has a reference solution and the inputs of its hidden tests; the expected
outputs are the reference's results on those inputs (computed once, in this process:
the references are taurl's own code). ``tests/envs/test_code_env.py`` checks a sample of
them against values worked out by hand, and that every reference passes its own tests
in the sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from taurl.types import JSONValue


@dataclass(frozen=True)
class Problem:
    """One function-writing problem."""

    name: str  # the function's name
    family: str  # "strings", "lists" (train) or "numbers", "grids" (heldout)
    signature: str  # the ``def`` line, e.g. "def reverse_words(s: str) -> str:"
    description: str  # what the function must do, one or two sentences
    reference: str  # a correct solution (source of the whole function)
    inputs: tuple[tuple[JSONValue, ...], ...]  # positional arguments of each hidden test

    @property
    def split(self) -> str:
        """``"train"`` or ``"heldout"``, from the family."""
        return "train" if self.family in TRAIN_FAMILIES else "heldout"

    @cached_property
    def cases(self) -> list[tuple[list[JSONValue], JSONValue]]:
        """``[(args, expected), ...]``: the hidden tests, JSON-normalised (tuples become lists)."""
        namespace: dict[str, object] = {}
        exec(self.reference, namespace)  # noqa: S102 - taurl's own reference solution
        fn = namespace[self.name]
        return [
            (list(args), json.loads(json.dumps(fn(*args))))  # type: ignore[operator]
            for args in self.inputs
        ]


TRAIN_FAMILIES = ("strings", "lists")
HELDOUT_FAMILIES = ("numbers", "grids")


def _p(
    name: str, family: str, signature: str, description: str, body: str, *inputs: tuple
) -> Problem:
    return Problem(name, family, signature, description, f"{signature}\n{body}", tuple(inputs))


PROBLEMS: tuple[Problem, ...] = (
    # -- strings (train) ----------------------------------------------------------------
    _p(
        "reverse_words",
        "strings",
        "def reverse_words(s: str) -> str:",
        "Return the words of s in reverse order, joined by single spaces.",
        "    return ' '.join(reversed(s.split()))",
        ("hello world",),
        ("a b c",),
        ("  one  ",),
        ("",),
        ("the quick brown fox",),
    ),
    _p(
        "is_palindrome",
        "strings",
        "def is_palindrome(s: str) -> bool:",
        "Return True if s reads the same forwards and backwards, ignoring case and every "
        "character that is not a letter or digit.",
        "    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]",
        ("A man, a plan, a canal: Panama",),
        ("race a car",),
        ("",),
        ("No 'x' in Nixon",),
        ("ab",),
    ),
    _p(
        "count_vowels",
        "strings",
        "def count_vowels(s: str) -> int:",
        "Return how many characters of s are vowels (a, e, i, o, u, either case).",
        "    return sum(c in 'aeiouAEIOU' for c in s)",
        ("hello",),
        ("AEIOU xyz",),
        ("",),
        ("rhythm",),
        ("Programming Language",),
    ),
    _p(
        "caesar_shift",
        "strings",
        "def caesar_shift(s: str, k: int) -> str:",
        "Shift every ASCII letter of s forward by k places in the alphabet (wrapping around, "
        "keeping case); leave other characters unchanged. k may be negative.",
        "    out = []\n    for c in s:\n        if 'a' <= c <= 'z':\n"
        "            out.append(chr((ord(c) - 97 + k) % 26 + 97))\n        elif 'A' <= c <= 'Z':\n"
        "            out.append(chr((ord(c) - 65 + k) % 26 + 65))\n        else:\n"
        "            out.append(c)\n    return ''.join(out)",
        ("abc", 1),
        ("xyz", 3),
        ("Hello, World!", 13),
        ("abc", -1),
        ("Zz", 52),
    ),
    _p(
        "run_length_encode",
        "strings",
        "def run_length_encode(s: str) -> str:",
        "Encode s as runs: each maximal run of one character becomes the character followed "
        "by the run length, e.g. 'aaabcc' -> 'a3b1c2'.",
        "    out = []\n    i = 0\n    while i < len(s):\n        j = i\n"
        "        while j < len(s) and s[j] == s[i]:\n            j += 1\n"
        "        out.append(f'{s[i]}{j - i}')\n        i = j\n    return ''.join(out)",
        ("aaabcc",),
        ("",),
        ("abc",),
        ("zzzzzzzzzzzz",),
        ("aabbaa",),
    ),
    _p(
        "capitalize_words",
        "strings",
        "def capitalize_words(s: str) -> str:",
        "Return s with the first letter of every space-separated word upper-cased and the "
        "rest of each word lower-cased; keep the spaces exactly as they are.",
        "    return ' '.join(w[:1].upper() + w[1:].lower() for w in s.split(' '))",
        ("hello world",),
        ("hELLO  wORLD",),
        ("",),
        ("a",),
        ("python is FUN",),
    ),
    _p(
        "longest_common_prefix",
        "strings",
        "def longest_common_prefix(words: list[str]) -> str:",
        "Return the longest string that is a prefix of every word in words ('' for an empty list).",
        "    if not words:\n        return ''\n    prefix = words[0]\n    for w in words[1:]:\n"
        "        while not w.startswith(prefix):\n            prefix = prefix[:-1]\n    return prefix",
        (["flower", "flow", "flight"],),
        (["dog", "racecar", "car"],),
        ([],),
        (["same", "same"],),
        (["interview", "internet", "interval"],),
    ),
    _p(
        "is_anagram",
        "strings",
        "def is_anagram(a: str, b: str) -> bool:",
        "Return True if a and b contain the same letters the same number of times, ignoring "
        "spaces and case.",
        "    norm = lambda s: sorted(s.replace(' ', '').lower())\n    return norm(a) == norm(b)",
        ("listen", "silent"),
        ("Dormitory", "dirty room"),
        ("abc", "abd"),
        ("", ""),
        ("aab", "abb"),
    ),
    _p(
        "most_common_char",
        "strings",
        "def most_common_char(s: str) -> str:",
        "Return the character that occurs most often in s; on a tie, the one that comes first "
        "in alphabetical (code point) order. s is not empty.",
        "    return min(set(s), key=lambda c: (-s.count(c), c))",
        ("hello",),
        ("abcabc",),
        ("zzy",),
        ("a",),
        ("mississippi",),
    ),
    _p(
        "remove_duplicate_chars",
        "strings",
        "def remove_duplicate_chars(s: str) -> str:",
        "Return s with every repeated character removed, keeping only its first occurrence.",
        "    return ''.join(dict.fromkeys(s))",
        ("banana",),
        ("",),
        ("abc",),
        ("aabbcc",),
        ("hello world",),
    ),
    _p(
        "word_counts",
        "strings",
        "def word_counts(s: str) -> dict[str, int]:",
        "Return a dict mapping each lower-cased space-separated word of s to how many times "
        "it occurs.",
        "    counts = {}\n    for w in s.lower().split():\n        counts[w] = counts.get(w, 0) + 1\n"
        "    return counts",
        ("the cat the hat",),
        ("",),
        ("A a A",),
        ("one",),
        ("x y z x",),
    ),
    _p(
        "to_snake_case",
        "strings",
        "def to_snake_case(s: str) -> str:",
        "Convert a camelCase or PascalCase identifier to snake_case: put '_' before every "
        "upper-case letter that is not the first character, then lower-case everything.",
        "    out = []\n    for i, c in enumerate(s):\n        if c.isupper() and i > 0:\n"
        "            out.append('_')\n        out.append(c.lower())\n    return ''.join(out)",
        ("helloWorld",),
        ("PascalCase",),
        ("x",),
        ("already_snake",),
        ("getHTTPResponse",),
    ),
    _p(
        "first_unique_index",
        "strings",
        "def first_unique_index(s: str) -> int:",
        "Return the index of the first character of s that occurs exactly once, or -1.",
        "    for i, c in enumerate(s):\n        if s.count(c) == 1:\n            return i\n    return -1",
        ("leetcode",),
        ("loveleetcode",),
        ("aabb",),
        ("",),
        ("z",),
    ),
    _p(
        "collapse_spaces",
        "strings",
        "def collapse_spaces(s: str) -> str:",
        "Return s with leading and trailing spaces removed and every run of spaces inside "
        "replaced by one space.",
        "    return ' '.join(w for w in s.split(' ') if w)",
        ("  a   b  ",),
        ("",),
        ("one",),
        ("x  y   z",),
        ("   ",),
    ),
    _p(
        "is_balanced",
        "strings",
        "def is_balanced(s: str) -> bool:",
        "Return True if the brackets (), [] and {} in s are balanced and properly nested; "
        "other characters are ignored.",
        "    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for c in s:\n"
        "        if c in '([{':\n            stack.append(c)\n        elif c in pairs:\n"
        "            if not stack or stack.pop() != pairs[c]:\n                return False\n"
        "    return not stack",
        ("([]{})",),
        ("([)]",),
        ("",),
        ("((",),
        ("a(b[c]d)e",),
        ("}",),
    ),
    # -- lists (train) ------------------------------------------------------------------
    _p(
        "second_largest",
        "lists",
        "def second_largest(nums: list[int]) -> int | None:",
        "Return the second largest distinct value in nums, or None if there are fewer than "
        "two distinct values.",
        "    distinct = sorted(set(nums))\n    return distinct[-2] if len(distinct) >= 2 else None",
        ([3, 1, 4, 1, 5],),
        ([7, 7],),
        ([],),
        ([-1, -2],),
        ([10, 9, 10, 8],),
    ),
    _p(
        "running_sum",
        "lists",
        "def running_sum(nums: list[int]) -> list[int]:",
        "Return the list of prefix sums: element i is nums[0] + ... + nums[i].",
        "    out, total = [], 0\n    for x in nums:\n        total += x\n        out.append(total)\n"
        "    return out",
        ([1, 2, 3, 4],),
        ([],),
        ([5],),
        ([3, -3, 3],),
        ([0, 0, 1],),
    ),
    _p(
        "flatten",
        "lists",
        "def flatten(nested: list) -> list:",
        "Flatten arbitrarily nested lists into one flat list, keeping the order of the "
        "non-list elements.",
        "    out = []\n    for x in nested:\n        if isinstance(x, list):\n"
        "            out.extend(flatten(x))\n        else:\n            out.append(x)\n    return out",
        ([1, [2, [3, [4]]], 5],),
        ([],),
        ([[[]]],),
        ([[1, 2], [3]],),
        (["a", ["b"]],),
    ),
    _p(
        "chunk",
        "lists",
        "def chunk(items: list, n: int) -> list[list]:",
        "Split items into consecutive chunks of length n (the last one may be shorter).",
        "    return [items[i:i + n] for i in range(0, len(items), n)]",
        ([1, 2, 3, 4, 5], 2),
        ([], 3),
        ([1, 2, 3], 3),
        ([1, 2, 3], 5),
        (list(range(7)), 3),
    ),
    _p(
        "rotate_left",
        "lists",
        "def rotate_left(items: list, k: int) -> list:",
        "Return items rotated left by k positions (k may exceed the length; an empty list "
        "stays empty).",
        "    if not items:\n        return []\n    k %= len(items)\n    return items[k:] + items[:k]",
        ([1, 2, 3, 4, 5], 2),
        ([1, 2, 3], 3),
        ([], 4),
        ([1, 2, 3], 7),
        (["a", "b"], 1),
    ),
    _p(
        "merge_sorted",
        "lists",
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:",
        "Merge two ascending lists into one ascending list (keep duplicates).",
        "    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
        "        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]",
        ([1, 3, 5], [2, 4, 6]),
        ([], [1]),
        ([1, 1], [1]),
        ([], []),
        ([-5, 0, 9], [-6, 10]),
    ),
    _p(
        "dedupe",
        "lists",
        "def dedupe(items: list) -> list:",
        "Return items without repeated elements, keeping the first occurrence of each, in order.",
        "    seen, out = set(), []\n    for x in items:\n        if x not in seen:\n"
        "            seen.add(x)\n            out.append(x)\n    return out",
        ([1, 2, 1, 3, 2],),
        ([],),
        (["a", "a"],),
        ([3, 2, 1],),
        ([0, 0, 0, 1],),
    ),
    _p(
        "pairwise_diff",
        "lists",
        "def pairwise_diff(nums: list[int]) -> list[int]:",
        "Return [nums[1] - nums[0], nums[2] - nums[1], ...] (empty for fewer than two numbers).",
        "    return [b - a for a, b in zip(nums, nums[1:])]",
        ([1, 4, 9, 16],),
        ([5],),
        ([],),
        ([3, 1],),
        ([0, 0, 0],),
    ),
    _p(
        "max_subarray_sum",
        "lists",
        "def max_subarray_sum(nums: list[int]) -> int:",
        "Return the largest sum of a non-empty contiguous sub-list of nums (nums is not empty).",
        "    best = cur = nums[0]\n    for x in nums[1:]:\n        cur = max(x, cur + x)\n"
        "        best = max(best, cur)\n    return best",
        ([-2, 1, -3, 4, -1, 2, 1, -5, 4],),
        ([-3, -1, -2],),
        ([5],),
        ([1, 2, 3],),
        ([2, -1, 2],),
    ),
    _p(
        "two_sum",
        "lists",
        "def two_sum(nums: list[int], target: int) -> list[int]:",
        "Return [i, j] with i < j and nums[i] + nums[j] == target, choosing the smallest j and "
        "then the smallest i; return [] if there is no such pair.",
        "    for j in range(len(nums)):\n        for i in range(j):\n"
        "            if nums[i] + nums[j] == target:\n                return [i, j]\n    return []",
        ([2, 7, 11, 15], 9),
        ([3, 2, 4], 6),
        ([1, 2], 7),
        ([3, 3], 6),
        ([1, 5, 1, 5], 10),
    ),
    _p(
        "move_zeros",
        "lists",
        "def move_zeros(nums: list[int]) -> list[int]:",
        "Return nums with every 0 moved to the end, the other numbers keeping their order.",
        "    return [x for x in nums if x != 0] + [0] * nums.count(0)",
        ([0, 1, 0, 3, 12],),
        ([],),
        ([0, 0],),
        ([1, 2],),
        ([0, -1, 0, 2],),
    ),
    _p(
        "transpose",
        "lists",
        "def transpose(matrix: list[list[int]]) -> list[list[int]]:",
        "Return the transpose of a rectangular matrix given as a list of rows ([] stays []).",
        "    return [list(col) for col in zip(*matrix)]",
        ([[1, 2, 3], [4, 5, 6]],),
        ([],),
        ([[1]],),
        ([[1], [2]],),
        ([[1, 2], [3, 4]],),
    ),
    _p(
        "count_inversions",
        "lists",
        "def count_inversions(nums: list[int]) -> int:",
        "Return the number of pairs (i, j) with i < j and nums[i] > nums[j].",
        "    return sum(nums[i] > nums[j] for j in range(len(nums)) for i in range(j))",
        ([2, 4, 1, 3, 5],),
        ([],),
        ([1, 2, 3],),
        ([3, 2, 1],),
        ([1, 1, 1],),
    ),
    _p(
        "longest_increasing_run",
        "lists",
        "def longest_increasing_run(nums: list[int]) -> int:",
        "Return the length of the longest contiguous strictly increasing run in nums (0 if empty).",
        "    best = cur = 0\n    for i, x in enumerate(nums):\n"
        "        cur = cur + 1 if i and x > nums[i - 1] else 1\n        best = max(best, cur)\n"
        "    return best",
        ([1, 3, 5, 4, 7],),
        ([2, 2, 2],),
        ([],),
        ([1, 2, 3, 4],),
        ([5, 1, 2, 0, 1, 2, 3],),
    ),
    _p(
        "interleave",
        "lists",
        "def interleave(a: list, b: list) -> list:",
        "Return a[0], b[0], a[1], b[1], ...; when one list runs out, append the rest of the other.",
        "    out = []\n    for i in range(max(len(a), len(b))):\n        if i < len(a):\n"
        "            out.append(a[i])\n        if i < len(b):\n            out.append(b[i])\n    return out",
        ([1, 2, 3], ["a", "b", "c"]),
        ([], [1]),
        ([1, 2, 3], [9]),
        ([], []),
        ([1], [2, 3, 4]),
    ),
    # -- numbers (heldout) --------------------------------------------------------------
    _p(
        "is_prime",
        "numbers",
        "def is_prime(n: int) -> bool:",
        "Return True if n is a prime number.",
        "    if n < 2:\n        return False\n    d = 2\n    while d * d <= n:\n"
        "        if n % d == 0:\n            return False\n        d += 1\n    return True",
        (2,),
        (1,),
        (97,),
        (91,),
        (7919,),
        (0,),
    ),
    _p(
        "gcd_list",
        "numbers",
        "def gcd_list(nums: list[int]) -> int:",
        "Return the greatest common divisor of the positive integers in nums (nums is not empty).",
        "    from math import gcd\n    g = 0\n    for x in nums:\n        g = gcd(g, x)\n    return g",
        ([12, 18, 24],),
        ([7],),
        ([17, 5],),
        ([100, 75, 50],),
        ([6, 6],),
    ),
    _p(
        "prime_factors",
        "numbers",
        "def prime_factors(n: int) -> list[int]:",
        "Return the prime factors of n >= 2 in ascending order, repeated by multiplicity.",
        "    out, d = [], 2\n    while d * d <= n:\n        while n % d == 0:\n"
        "            out.append(d)\n            n //= d\n        d += 1\n    if n > 1:\n"
        "        out.append(n)\n    return out",
        (12,),
        (2,),
        (97,),
        (360,),
        (1001,),
    ),
    _p(
        "digit_sum",
        "numbers",
        "def digit_sum(n: int) -> int:",
        "Return the sum of the decimal digits of n (ignore a minus sign).",
        "    return sum(int(c) for c in str(abs(n)))",
        (123,),
        (0,),
        (-45,),
        (99999,),
        (1000,),
    ),
    _p(
        "fibonacci",
        "numbers",
        "def fibonacci(n: int) -> int:",
        "Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
        "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        (0,),
        (1,),
        (10,),
        (30,),
        (2,),
    ),
    _p(
        "collatz_steps",
        "numbers",
        "def collatz_steps(n: int) -> int:",
        "Return how many steps the Collatz map (n -> n / 2 if even, else 3n + 1) takes to "
        "reach 1 from n >= 1.",
        "    steps = 0\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
        "        steps += 1\n    return steps",
        (1,),
        (6,),
        (27,),
        (2,),
        (97,),
    ),
    _p(
        "is_perfect",
        "numbers",
        "def is_perfect(n: int) -> bool:",
        "Return True if n >= 1 equals the sum of its proper divisors (e.g. 6 = 1 + 2 + 3).",
        "    return n > 1 and sum(d for d in range(1, n) if n % d == 0) == n",
        (6,),
        (28,),
        (12,),
        (1,),
        (496,),
    ),
    _p(
        "binomial",
        "numbers",
        "def binomial(n: int, k: int) -> int:",
        "Return the binomial coefficient C(n, k), which is 0 when k < 0 or k > n.",
        "    if k < 0 or k > n:\n        return 0\n    from math import comb\n    return comb(n, k)",
        (5, 2),
        (10, 0),
        (3, 5),
        (20, 10),
        (6, -1),
    ),
    _p(
        "count_primes_below",
        "numbers",
        "def count_primes_below(n: int) -> int:",
        "Return how many primes are strictly less than n.",
        "    return sum(all(p % d for d in range(2, int(p ** 0.5) + 1)) for p in range(2, n))",
        (10,),
        (0,),
        (2,),
        (100,),
        (3,),
    ),
    _p(
        "to_base",
        "numbers",
        "def to_base(n: int, base: int) -> str:",
        "Write the non-negative integer n in the given base (2 to 36) using digits 0-9 then "
        "lower-case letters a-z.",
        "    digits = '0123456789abcdefghijklmnopqrstuvwxyz'\n    if n == 0:\n        return '0'\n"
        "    out = ''\n    while n:\n        out = digits[n % base] + out\n        n //= base\n"
        "    return out",
        (10, 2),
        (255, 16),
        (0, 7),
        (35, 36),
        (100, 3),
    ),
    _p(
        "lcm_range",
        "numbers",
        "def lcm_range(n: int) -> int:",
        "Return the least common multiple of 1, 2, ..., n (n >= 1).",
        "    from math import gcd\n    out = 1\n    for i in range(1, n + 1):\n"
        "        out = out * i // gcd(out, i)\n    return out",
        (1,),
        (4,),
        (10,),
        (20,),
        (7,),
    ),
    _p(
        "is_armstrong",
        "numbers",
        "def is_armstrong(n: int) -> bool:",
        "Return True if the non-negative n equals the sum of its digits each raised to the "
        "number of digits (e.g. 153 = 1^3 + 5^3 + 3^3).",
        "    s = str(n)\n    return n == sum(int(c) ** len(s) for c in s)",
        (153,),
        (10,),
        (9474,),
        (0,),
        (100,),
    ),
    _p(
        "digital_root",
        "numbers",
        "def digital_root(n: int) -> int:",
        "Repeatedly sum the decimal digits of the non-negative n until one digit remains; "
        "return it.",
        "    while n >= 10:\n        n = sum(int(c) for c in str(n))\n    return n",
        (16,),
        (942,),
        (0,),
        (999999999,),
        (10,),
    ),
    _p(
        "totient",
        "numbers",
        "def totient(n: int) -> int:",
        "Return Euler's totient of n >= 1: how many k in 1..n have gcd(k, n) == 1.",
        "    from math import gcd\n    return sum(gcd(k, n) == 1 for k in range(1, n + 1))",
        (1,),
        (9,),
        (10,),
        (13,),
        (36,),
    ),
    # -- grids (heldout) ----------------------------------------------------------------
    _p(
        "count_islands",
        "grids",
        "def count_islands(grid: list[str]) -> int:",
        "grid is a list of equal-length rows of '#' (land) and '.' (water). Return the number "
        "of islands: groups of land cells connected up, down, left or right.",
        "    seen = set()\n    count = 0\n    for r in range(len(grid)):\n"
        "        for c in range(len(grid[r])):\n            if grid[r][c] == '#' and (r, c) not in seen:\n"
        "                count += 1\n                stack = [(r, c)]\n                while stack:\n"
        "                    y, x = stack.pop()\n"
        "                    if (y, x) in seen or not (0 <= y < len(grid) and 0 <= x < len(grid[y])):\n"
        "                        continue\n                    if grid[y][x] != '#':\n"
        "                        continue\n                    seen.add((y, x))\n"
        "                    stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]\n"
        "    return count",
        (["#..", ".#.", "..#"],),
        (["##", "##"],),
        ([],),
        (["#.#", "###"],),
        (["...", "..."],),
    ),
    _p(
        "grid_neighbors_sum",
        "grids",
        "def grid_neighbors_sum(grid: list[list[int]], r: int, c: int) -> int:",
        "Return the sum of the up to 8 cells around (row r, column c) of the rectangular grid, "
        "not counting the cell itself.",
        "    total = 0\n    for dr in (-1, 0, 1):\n        for dc in (-1, 0, 1):\n"
        "            y, x = r + dr, c + dc\n"
        "            if (dr or dc) and 0 <= y < len(grid) and 0 <= x < len(grid[0]):\n"
        "                total += grid[y][x]\n    return total",
        ([[1, 2, 3], [4, 5, 6], [7, 8, 9]], 1, 1),
        ([[1, 2], [3, 4]], 0, 0),
        ([[5]], 0, 0),
        ([[1, 1, 1], [1, 1, 1]], 1, 2),
    ),
    _p(
        "rotate_grid",
        "grids",
        "def rotate_grid(grid: list[list[int]]) -> list[list[int]]:",
        "Return the rectangular grid rotated 90 degrees clockwise.",
        "    return [list(row) for row in zip(*grid[::-1])]",
        ([[1, 2], [3, 4]],),
        ([[1, 2, 3]],),
        ([[1], [2], [3]],),
        ([],),
    ),
    _p(
        "shortest_path_length",
        "grids",
        "def shortest_path_length(grid: list[str]) -> int:",
        "grid is a list of equal-length rows of '.' (open) and '#' (wall). Return the fewest "
        "up/down/left/right moves from the top-left to the bottom-right cell, or -1 if it cannot "
        "be reached (or either corner is a wall).",
        "    from collections import deque\n    h, w = len(grid), len(grid[0])\n"
        "    if grid[0][0] == '#' or grid[h - 1][w - 1] == '#':\n        return -1\n"
        "    dist = {(0, 0): 0}\n    queue = deque([(0, 0)])\n    while queue:\n"
        "        y, x = queue.popleft()\n        if (y, x) == (h - 1, w - 1):\n"
        "            return dist[(y, x)]\n"
        "        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):\n"
        "            if 0 <= ny < h and 0 <= nx < w and grid[ny][nx] == '.' and (ny, nx) not in dist:\n"
        "                dist[(ny, nx)] = dist[(y, x)] + 1\n                queue.append((ny, nx))\n"
        "    return -1",
        (["...", ".#.", "..."],),
        (["..", "##", ".."],),
        (["."],),
        (["#."],),
        ([".#..", "...#", "#..."],),
    ),
    _p(
        "diagonal_sum",
        "grids",
        "def diagonal_sum(grid: list[list[int]]) -> int:",
        "Return the sum of both diagonals of a square grid, counting the centre cell once when "
        "the size is odd.",
        "    n = len(grid)\n    total = sum(grid[i][i] + grid[i][n - 1 - i] for i in range(n))\n"
        "    return total - (grid[n // 2][n // 2] if n % 2 else 0)",
        ([[1, 2, 3], [4, 5, 6], [7, 8, 9]],),
        ([[1, 2], [3, 4]],),
        ([[7]],),
        ([],),
    ),
)
