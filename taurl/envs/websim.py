"""A small fictional encyclopedia, generated from a seed and served over real HTTP.

:func:`generate_site` builds a world of countries, cities and people whose pages link
to each other (a person's page links to the city of birth, a city's page to its
country and mayor, a country's page to its capital); :class:`SiteServer` serves it
with the standard library's ``ThreadingHTTPServer`` on ``127.0.0.1`` (port 0: an
ephemeral port) from a daemon thread.

Endpoints::

    GET /                    index page linking every article
    GET /wiki/<slug>         one article (HTML)
    GET /search?q=<words>    JSON {"query": ..., "results": [{"title", "url", "snippet"}]}
                             best matches first (articles ranked by matching words)

The same seed always gives the same site, so a server in another process or machine
started with that seed serves exactly what ``taurl/Web-v0`` asks about (see its
``base_url`` option).
"""

from __future__ import annotations

import html
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np

from taurl.errors import ConfigError

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "kr",
    "st",
    "th",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m")
_PROFESSIONS = (
    "painter",
    "engineer",
    "botanist",
    "sailor",
    "composer",
    "physician",
    "baker",
    "astronomer",
)
_LANGUAGE_SUFFIX = "ish"
_CURRENCY_UNITS = ("crown", "mark", "florin", "dinar", "lira", "thaler")


@dataclass(frozen=True)
class Page:
    """One article: its URL path, title, HTML body and plain text (for search)."""

    path: str  # e.g. "/wiki/tarvo"
    title: str
    body_html: str
    text: str


@dataclass
class Site:
    """A generated world and its pages. Entities are plain dicts of attributes."""

    seed: int
    countries: list[dict[str, str]] = field(default_factory=list)
    cities: list[dict[str, str]] = field(default_factory=list)
    people: list[dict[str, str]] = field(default_factory=list)
    pages: dict[str, Page] = field(default_factory=dict)

    def search(self, query: str, limit: int = 5) -> list[dict[str, str]]:
        """Articles ranked by how many query words they contain (title words count triple)."""
        words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 1]
        scored = []
        for page in self.pages.values():
            if page.path == "/":
                continue
            title, text = page.title.lower(), page.text.lower()
            score = sum(3 * (w in title) + (w in text) for w in words)
            if score:
                scored.append((-score, page.title, page))
        scored.sort(key=lambda item: item[:2])
        return [
            {"title": p.title, "url": p.path, "snippet": p.text[:160]} for _, _, p in scored[:limit]
        ]


def _name(rng: np.random.Generator, syllables: int, used: set[str]) -> str:
    while True:
        word = "".join(
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(syllables)
        ).capitalize()
        if word not in used and len(word) >= 4:
            used.add(word)
            return word


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _link(entity: dict[str, str]) -> str:
    return f'<a href="{entity["url"]}">{html.escape(entity["name"])}</a>'


def generate_site(seed: int, n_countries: int = 6, n_cities: int = 18, n_people: int = 40) -> Site:
    """Build the world for ``seed``: countries, cities (each in a country), people (each
    born in a city); every country has a capital city, every city a mayor."""
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    site = Site(seed=seed)
    for _ in range(n_countries):
        name = _name(rng, 3, used)
        site.countries.append(
            {
                "name": name,
                "language": name[:-1] + _LANGUAGE_SUFFIX
                if name[-1] in "aeiou"
                else name + _LANGUAGE_SUFFIX,
                "currency": f"{name} {_CURRENCY_UNITS[rng.integers(len(_CURRENCY_UNITS))]}",
            }
        )
    for i in range(n_cities):
        country = site.countries[i % n_countries]  # every country gets cities
        site.cities.append(
            {
                "name": _name(rng, 2, used),
                "country": country["name"],
                "population": str(int(rng.integers(5, 900)) * 1000),
            }
        )
    for country, city in zip(site.countries, site.cities[:n_countries], strict=True):
        country["capital"] = city["name"]
    for _ in range(n_people):
        city = site.cities[int(rng.integers(n_cities))]
        site.people.append(
            {
                "name": f"{_name(rng, 2, used)} {_name(rng, 2, used)}",
                "born_in": city["name"],
                "birth_year": str(int(rng.integers(1820, 1990))),
                "profession": _PROFESSIONS[rng.integers(len(_PROFESSIONS))],
            }
        )
    mayors = rng.permutation(n_people)[:n_cities]
    for city, p in zip(site.cities, mayors, strict=True):
        city["mayor"] = site.people[int(p)]["name"]
    for entity in site.countries + site.cities + site.people:
        entity["url"] = f"/wiki/{_slug(entity['name'])}"
    _write_pages(site)
    return site


def _write_pages(site: Site) -> None:
    by_name = {e["name"]: e for e in site.countries + site.cities + site.people}
    for c in site.countries:
        capital = by_name[c["capital"]]
        cities = ", ".join(_link(x) for x in site.cities if x["country"] == c["name"])
        _add(
            site,
            c,
            [
                f"{c['name']} is a country. Its capital is {_link(capital)}.",
                f"The official language of {c['name']} is {c['language']}.",
                f"The currency of {c['name']} is the {c['currency']}.",
                f"Cities of {c['name']}: {cities}.",
            ],
        )
    for c in site.cities:
        country, mayor = by_name[c["country"]], by_name[c["mayor"]]
        _add(
            site,
            c,
            [
                f"{c['name']} is a city in {_link(country)} with a population of {c['population']}.",
                f"The mayor of {c['name']} is {_link(mayor)}.",
            ],
        )
    for p in site.people:
        city = by_name[p["born_in"]]
        _add(
            site,
            p,
            [
                f"{p['name']} is {'an' if p['profession'][0] in 'aeiou' else 'a'} {p['profession']}.",
                f"{p['name']} was born in {_link(city)} in {p['birth_year']}.",
            ],
        )
    index = "".join(f"<li>{_link(e)}</li>" for e in site.countries + site.cities + site.people)
    site.pages["/"] = Page("/", "Index", f"<ul>{index}</ul>", "Index")


def _add(site: Site, entity: dict[str, str], paragraphs: list[str]) -> None:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    text = " ".join(re.sub(r"<[^>]+>", "", p) for p in paragraphs)
    site.pages[entity["url"]] = Page(entity["url"], entity["name"], body, html.unescape(text))


def render(page: Page) -> str:
    """The full HTML document of ``page``."""
    title = html.escape(page.title)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head>"
        f'<body><h1>{title}</h1>{page.body_html}<p><a href="/">Index</a></p></body></html>'
    )


class SiteServer:
    """Serves a :class:`Site` on ``http://127.0.0.1:<port>`` from a daemon thread.

    Args:
        site: What to serve.
        port: 0 picks a free ephemeral port.
        fail_every: If > 0, every ``fail_every``-th request gets ``503 Service
            Unavailable`` (deterministic flakiness, for exercising clients' retries).
    """

    def __init__(self, site: Site, port: int = 0, fail_every: int = 0) -> None:
        if fail_every < 0:
            raise ConfigError(
                f"SiteServer: fail_every must be >= 0 (0 = never fail), got {fail_every}"
            )
        self.site = site
        self.fail_every = fail_every
        self.requests = 0  # requests received, failed ones included
        self.failures = 0  # requests answered with 503 on purpose
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="taurl-websim", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            fail = self.fail_every > 0 and self.requests % self.fail_every == 0
            self.failures += fail
            return fail

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if server._should_fail():
                    self._send(503, "text/plain", b"temporarily unavailable, try again")
                    return
                parts = urlsplit(self.path)
                if parts.path == "/search":
                    query = parse_qs(parts.query).get("q", [""])[0]
                    body = json.dumps({"query": query, "results": server.site.search(query)})
                    self._send(200, "application/json", body.encode())
                    return
                page = server.site.pages.get(parts.path.rstrip("/") or "/")
                if page is None:
                    self._send(404, "text/plain", f"no page at {parts.path}".encode())
                    return
                self._send(200, "text/html; charset=utf-8", render(page).encode())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # one line per request on stderr would drown test output

        return Handler

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
