"""Multi-hop questions answered by browsing a local web site: ``taurl/Web-v0``.

The site (:mod:`taurl.envs.websim`) is a fictional encyclopedia generated from
``site_seed`` and served over real HTTP on ``127.0.0.1`` (an ephemeral port, started on
the first ``reset`` and stopped by :meth:`WebEnv.close`). Each question needs two or
three hops through linked pages, e.g. person → city of birth → country.

Tools (each fetches through ``httpx`` with ``tenacity`` retries on connection errors
and 5xx answers):

* ``search(query)`` — ``GET /search?q=``: titles, URLs and snippets of the best matches;
* ``open_url(url)`` — fetch a page (absolute, or a path on the site) and show its text,
  links written as ``text [url]``; it becomes the current page;
* ``find_in_page(text)`` — the lines of the current page that contain ``text``.

``base_url`` points the tools elsewhere, e.g. at a :class:`~taurl.envs.websim.SiteServer`
in another process or a real site with the same endpoints; the environment then
starts no server of its own (questions still come from ``site_seed``'s world).

**Answer format** (as in ``taurl/Calculator-v0``): the content of the last
``<answer>...</answer>``, else the whole message. It is correct when, ignoring case,
punctuation and spacing, it equals the expected answer or contains it while being at
most five words longer. Reward 1.0 or 0.0, plus the tool layer's format penalties.

**Splits** differ in kind: ``train`` asks where a person was born (country) and which
currency is used there; ``heldout`` asks in which year a city's mayor was born and
which language is spoken in the country with a given capital — other relations and
other hop orders over the same site.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import urljoin

import gymnasium
import httpx
import numpy as np
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from taurl.envs.base import Task, ToolEnv, answer_tag
from taurl.envs.tools import Tool
from taurl.envs.websim import Site, SiteServer, generate_site
from taurl.errors import ConfigError
from taurl.types import Message

_INSTRUCTIONS = (
    "Use the search, open_url and find_in_page tools to look it up on the web site. "
    "Give the final answer inside <answer></answer> tags."
)
_MAX_PAGE_CHARS = 1500


class _TextExtractor(HTMLParser):
    """HTML → readable text; links become ``text [href]``, block tags become line breaks."""

    _BLOCKS = frozenset({"p", "li", "h1", "h2", "h3", "br", "div", "tr", "title"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._href: str | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag == "a":
            self._href = dict(attrs).get("href")
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag == "a" and self._href:
            self.parts.append(f" [{self._href}]")
            self._href = None
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(document: str) -> str:
    """Readable text of an HTML document: one line per block, links as ``text [url]``."""
    parser = _TextExtractor()
    parser.feed(document)
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def normalize_answer(text: str) -> str:
    """Lower-case words and digits only, single-spaced: ``" The  Lumer-crown!"`` → ``"the lumer crown"``."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class WebEnv(ToolEnv):
    """Multi-hop questions about a generated web site, answered with browsing tools.

    Args:
        split: ``"train"`` or ``"heldout"`` (other question kinds, same site).
        site_seed: Seed of the generated site (the world the questions are about).
        base_url: Where the tools send requests; None serves the site locally.
        max_turns: Assistant turns before truncation.
        http_timeout_s: Time limit of one HTTP request.
        http_retries: Attempts per request on connection errors and 5xx answers.
        fail_every: For the local server: every n-th request answers 503 (0 = never);
            exercises the retries.
        **tool_env_kwargs: Options of :class:`~taurl.envs.base.ToolEnv`.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        site_seed: int = 0,
        base_url: str | None = None,
        max_turns: int = 8,
        http_timeout_s: float = 5.0,
        http_retries: int = 3,
        fail_every: int = 0,
        **tool_env_kwargs: object,
    ) -> None:
        if base_url is not None and not re.match(r"^https?://", base_url):
            raise ConfigError(
                f"WebEnv: base_url must start with http:// or https://, got {base_url!r}"
            )
        if not http_retries >= 1:
            raise ConfigError(
                f"WebEnv: http_retries must be >= 1 (1 = no retry), got {http_retries}"
            )
        if not http_timeout_s > 0:
            raise ConfigError(f"WebEnv: http_timeout_s must be > 0, got {http_timeout_s}")
        tools = [
            Tool.from_function(self.search, examples={"query": "Lumeria capital"}),
            Tool.from_function(self.open_url, examples={"url": "/wiki/lumeria"}),
            Tool.from_function(self.find_in_page, examples={"text": "capital"}),
        ]
        # Each tool bounds itself: http_timeout_s per attempt, http_retries attempts.
        tool_env_kwargs.setdefault("tool_timeout_s", None)
        super().__init__(tools, split, max_turns=max_turns, **tool_env_kwargs)  # type: ignore[arg-type]
        self.site: Site = generate_site(site_seed)
        self.site_seed = site_seed
        self.fail_every = fail_every
        self._base_url = base_url
        self._server: SiteServer | None = None
        self._client: httpx.Client | None = None
        self._http_timeout_s = http_timeout_s
        self._http_retries = http_retries
        self._page_url: str | None = None
        self._page_text: str | None = None

    # -- HTTP ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Where the tools fetch from; starts the local server on first use."""
        if self._base_url is None:
            self._server = SiteServer(self.site, fail_every=self.fail_every)
            self._base_url = self._server.url
        return self._base_url

    def _get(self, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        if self._client is None:
            self._client = httpx.Client(timeout=self._http_timeout_s, follow_redirects=True)
        absolute = urljoin(self.base_url + "/", url)

        @retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self._http_retries),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        def fetch() -> httpx.Response:
            response = self._client.get(absolute, params=params)  # type: ignore[union-attr]
            response.raise_for_status()
            return response

        return fetch()

    # -- tools ---------------------------------------------------------------------------

    def search(self, query: str) -> str:
        """Search the web site; returns the best-matching pages with their URLs.

        Args:
            query: A few keywords, e.g. a name.
        """
        results = self._get("/search", params={"q": query}).json()["results"]
        if not results:
            return f"No results for {query!r}."
        return "\n".join(f"{r['title']} [{r['url']}]: {r['snippet']}" for r in results)

    def open_url(self, url: str) -> str:
        """Open a page and show its text; links appear as ``text [url]``.

        Args:
            url: A URL from a search result or a link, e.g. "/wiki/lumeria".
        """
        response = self._get(url)
        text = html_to_text(response.text)
        self._page_url, self._page_text = str(response.url), text
        if len(text) > _MAX_PAGE_CHARS:
            text = text[:_MAX_PAGE_CHARS] + "\n[... page cut; use find_in_page to search all of it]"
        return text

    def find_in_page(self, text: str) -> str:
        """Show the lines of the currently open page that contain the text (case-insensitive).

        Args:
            text: The words to look for.
        """
        if self._page_text is None:
            raise ValueError("no page is open; call open_url first")
        needle = text.lower().strip()
        lines = [line for line in self._page_text.splitlines() if needle in line.lower()]
        if not lines:
            return f"{text!r} does not occur on {self._page_url}."
        return "\n".join(lines[:10])

    # -- tasks ---------------------------------------------------------------------------

    def on_reset(self, task: Task) -> None:
        super().on_reset(task)
        self._page_url = self._page_text = None

    def make_task(self, rng: np.random.Generator) -> Task:
        s = self.site
        by_name = {e["name"]: e for e in s.countries + s.cities + s.people}
        kinds = (
            ("born_country", "born_currency")
            if self.split == "train"
            else ("mayor_year", "capital_language")
        )
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "born_country":  # person -> city (its page names the country)
            person = s.people[int(rng.integers(len(s.people)))]
            city = by_name[person["born_in"]]
            question = f"In which country was {person['name']} born?"
            answer, subject, chain = city["country"], person["name"], [person, city]
        elif kind == "born_currency":  # person -> city -> country
            person = s.people[int(rng.integers(len(s.people)))]
            city = by_name[person["born_in"]]
            country = by_name[city["country"]]
            question = f"What is the currency of the country where {person['name']} was born?"
            answer, subject, chain = country["currency"], person["name"], [person, city, country]
        elif kind == "mayor_year":  # city -> person
            city = s.cities[int(rng.integers(len(s.cities)))]
            mayor = by_name[city["mayor"]]
            question = f"In which year was the mayor of {city['name']} born?"
            answer, subject, chain = mayor["birth_year"], city["name"], [city, mayor]
        else:  # capital city -> country
            country = s.countries[int(rng.integers(len(s.countries)))]
            capital = by_name[country["capital"]]
            question = (
                f"Which language is spoken in the country whose capital is {capital['name']}?"
            )
            answer, subject, chain = country["language"], capital["name"], [capital, country]
        hops = [e["url"] for e in chain]
        return Task(
            id=f"web/{self.split}/{self.site_seed}/{kind}/{subject.replace(' ', '_')}",
            prompt=f"{question} {_INSTRUCTIONS}",
            answer=answer,
            privileged_context=" -> ".join(f"{e['name']} ({e['url']})" for e in chain)
            + f"; answer: {answer}",
            metadata={"kind": kind, "subject": subject, "hops": hops},
        )

    def extract_answer(self, text: str) -> str:
        tagged = answer_tag(text)
        return tagged if tagged is not None else text

    def score(self, task: Task, answer: str) -> bool:
        got, expected = normalize_answer(answer), normalize_answer(str(task.answer))
        if got == expected:
            return True
        padded = f" {got} "
        return f" {expected} " in padded and len(got.split()) <= len(expected.split()) + 5

    def close(self) -> None:
        """Close the HTTP client and stop the local server (if this env started one)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.close()
            self._server = None
            self._base_url = None
        super().close()


def _tool_call(name: str, **arguments: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def oracle_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted solver: search the subject, open each page of the chain, check a line, answer.

    Turn 0 searches, turns 1..n open the hop pages (after the first, it also uses
    ``find_in_page`` once), and the last turn answers from the final page's text.
    """
    web: WebEnv = env.unwrapped
    task = web.task
    hops: list[str] = task.metadata["hops"]
    turn = sum(m["role"] == "assistant" for m in messages)
    if turn == 0:
        return _tool_call("search", query=task.metadata["subject"])
    if turn <= len(hops):
        return _tool_call("open_url", url=hops[turn - 1])
    if turn == len(hops) + 1:
        return _tool_call("find_in_page", text=str(task.answer))
    return f"The page confirms it.\n<answer>{task.answer}</answer>"


def failing_policy(env: gymnasium.Env, messages: list[Message]) -> str:
    """Scripted wrong answer without browsing: the subject itself."""
    return f"<answer>{env.unwrapped.task.metadata['subject']}</answer>"
