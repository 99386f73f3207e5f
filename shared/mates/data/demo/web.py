"""Generated web-style noise: boilerplate pages, shuffled and truncated copies,
near-duplicates and spam, each labelled and traced to the document it came from."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import count

from mates.data.demo.common import EDIT_SHARES, EDITS, SHARES, WEB_DOMAINS, Doc, TextT, stage_rng

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- web-style noise

_SITE_A = "Daily Metro Global Northern City Evening Weekly Digital Morning Coastal".split()
_SITE_B = "Herald Gazette Post Chronicle Courier Tribune Online Wire Observer Express".split()
_NAV = (
    "Home News Sport Business Tech Entertainment Politics Weather Travel Culture Opinion "
    "Video Podcasts Health Science Money Lifestyle Puzzles Jobs Property Motors"
).split()
_FOOTER = [
    "About us", "Contact us", "Privacy policy", "Cookie policy", "Terms of use", "Accessibility",
    "Careers", "Advertise with us", "Help", "Sitemap", "Complaints", "Modern slavery statement",
]  # fmt: skip
_COOKIE = [
    "We use cookies to give you the best experience on our website. By continuing to browse "
    "you agree to our use of cookies. [Accept all] [Manage preferences]",
    "This site uses cookies to personalise content and ads, to provide social media features "
    "and to analyse our traffic. Read our Cookie Policy. [OK] [Settings]",
    "We and our partners store and/or access information on a device, such as cookies, and "
    "process personal data. [I agree] [More options]",
]
_NEWSLETTER = [
    "Subscribe to our newsletter\nGet the day's top stories delivered straight to your inbox.\n"
    "Enter your email address [Sign up]\nWe respect your privacy. Unsubscribe at any time.",
    "Never miss a story! Sign up for our free daily briefing.\nEmail: ____________ [Subscribe]",
    "Join 250,000 readers of {site}. Subscribe to our newsletter for exclusive offers and news.",
]
_SHARE = ["Share on Facebook | Share on Twitter | Email | Print", "Share this: f  t  in  @  ⎙"]
_SPAM_TOPICS = [
    "cheap flights", "replica watches", "weight loss pills", "payday loans", "casino bonus",
    "crypto trading", "car insurance", "web hosting", "seo services", "online degree",
    "cheap viagra", "designer handbags", "forex signals", "essay writing service",
]  # fmt: skip
_SPAM_MODS = "best cheap top discount free official guaranteed fast trusted cheapest 2024".split()
_SPAM_PLACES = "London Manchester Leeds Glasgow Bristol Dublin online UK USA near-me".split()
_SPAM_LINES = [
    "Looking for {m} {t} in {p}? We offer the {m} {t} {p}.",
    "{M} {t} {t} {t} {p} - {cta}!",
    "Compare {m} {t} and {other} deals. {m} {t} near me, {t} reviews.",
    "{cta}: {pct}% off {t}. {t} {p}. {M} {t} {p}.",
]
_SPAM_CTA = ["Click here", "Buy now", "Order today", "Limited offer", "Call now", "Visit our site"]


def _site_name(rng: random.Random) -> str:
    """A made-up news site name, e.g. `The Morning Courier`."""
    return f"The {rng.choice(_SITE_A)} {rng.choice(_SITE_B)}"


def _snippet(doc: Doc, rng: random.Random) -> str:
    """A short real excerpt (a few hundred characters, cut at a line or word end)."""
    text = doc.text[: rng.randint(200, 450)]
    cut = max(text.rfind("\n"), text.rfind(". ") + 1)
    return text[:cut] if cut > 100 else text.rsplit(" ", 1)[0] + " ..."


def boilerplate(rng: random.Random, headlines: Sequence[str], snippet: str | None) -> str:
    """Navigation, cookie banner, links, newsletter and footer, optionally around a snippet."""
    site = _site_name(rng)
    parts = [f"Skip to main content\n{site}\n" + " | ".join(rng.sample(_NAV, rng.randint(5, 11)))]
    if rng.random() < 0.6:
        parts.append(rng.choice(_COOKIE))
    if snippet:
        parts += [snippet, rng.choice(_SHARE)]
    if rng.random() < 0.7:
        title = rng.choice(["Most read", "Related stories", "More from " + site, "Trending now"])
        parts.append(
            title + "\n" + "\n".join(f"- {h}" for h in rng.sample(headlines, rng.randint(3, 8)))
        )
    parts.append(rng.choice(_NEWSLETTER).format(site=site))
    footer = " | ".join(rng.sample(_FOOTER, rng.randint(4, 9)))
    year = rng.randint(2003, 2024)
    parts.append(f"{footer}\n© {year} {site} Media Ltd. All rights reserved.")
    return "\n\n".join(parts)


def near_duplicate(doc: Doc, rng: random.Random) -> str:
    """A copy with a few words swapped or dropped, changed whitespace and a tracking line."""
    words = doc.text.split(" ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    for _ in range(rng.randint(1, 3)):
        if len(words) > 2:
            del words[rng.randrange(len(words))]
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text.replace("\n\n", "\n")
    if rng.random() < 0.5:
        text = re.sub(r"\. ", ".  ", text)
    slug = "-".join(doc.text.split()[:5]).lower()
    slug = re.sub(r"[^a-z0-9-]", "", slug)
    tracker = (
        f"https://www.example-news.com/{slug}?utm_source={rng.choice(['fb', 'tw', 'rss', 'email'])}"
    )
    return f"{text}\n\nRead more: {tracker}&utm_medium=social&ref={rng.randrange(10**6):06d}"


def shuffled(doc: Doc, rng: random.Random) -> str:
    """The document's words in random order."""
    words = doc.text.split()
    rng.shuffle(words)
    return " ".join(words)


def truncated(doc: Doc, rng: random.Random) -> str:
    """The document cut to 10–30% of its length at a word boundary, mid-sentence."""
    text = doc.text[: int(len(doc.text) * rng.uniform(0.10, 0.30))]
    text = text[: max(text.rfind(" "), text.rfind("\n"))].rstrip() or text
    while len(text) > 20 and text[-1] in ".!?\"'":
        text = text[: max(text.rfind(" "), text.rfind("\n"))].rstrip()
    return text


def spam(rng: random.Random) -> str:
    """Keyword-stuffed SEO text."""
    topic, place = rng.choice(_SPAM_TOPICS), rng.choice(_SPAM_PLACES)
    mods = rng.sample(_SPAM_MODS, 4)
    lines = [f"{mods[0].upper()} {topic.upper()} {place.upper()} - {mods[1]} {topic} {place}!!!"]
    for _ in range(rng.randint(4, 12)):
        m = rng.choice(_SPAM_MODS)
        line = rng.choice(_SPAM_LINES).format(
            m=m, M=m.title(), t=topic, p=place, other=rng.choice(_SPAM_TOPICS),
            cta=rng.choice(_SPAM_CTA), pct=rng.randint(10, 90),
        )  # fmt: skip
        lines.append(line)
    tags = rng.sample(_SPAM_TOPICS, 5) + [f"{m} {topic}" for m in mods]
    return "\n".join(lines) + "\nTags: " + ", ".join(tags)


def _web_doc(kind: str, i: int, base: Doc, rng: random.Random, headlines: Sequence[str]) -> Doc:
    """Web-style document number `i` of a kind; edits of `base` are labelled under its domain."""
    doc_id = f"web-{kind.replace('_', '-')}-{i:04d}"
    if kind == "spam":
        return Doc(doc_id, spam(rng), "web/spam", "generated:spam")
    if kind == "boilerplate":
        snippet = _snippet(base, rng) if rng.random() < 0.4 else None
        text, derived_from = boilerplate(rng, headlines, snippet), base.id if snippet else None
    else:
        make = {"near_duplicate": near_duplicate, "shuffled": shuffled, "truncated": truncated}
        text, derived_from = make[kind](base, rng), base.id
    domain = f"{base.domain}/{kind}" if kind in EDITS else f"web/{kind}"
    source = f"generated:{kind}" + (f"<{derived_from}" if derived_from else "")
    return Doc(doc_id, text, domain, source, derived_from)


def _web_stream(
    kind: str, bases: Sequence[Doc], headlines: Sequence[str], rng: random.Random, start: int = 0
) -> Iterator[Doc]:
    """Endless web-style documents of one kind, numbered from `start`, made from `bases` in a
    seeded random order (cycling through them)."""
    order = rng.sample(list(bases), len(bases))
    for i in count(start):
        yield _web_doc(kind, i, order[(i - start) % len(order)], rng, headlines)


def fill_budget_chars(items: Iterable[TextT], budget: float) -> list[TextT]:
    """The longest prefix of `items` whose texts hold at most `budget` characters in all."""
    taken, size = [], 0
    for item in items:
        size += len(item.text)
        if size > budget:
            break
        taken.append(item)
    return taken


def real_share(part: str) -> float:
    """Share of the pool's characters held by a part's own (unedited) documents."""
    return SHARES[part] * (1 - sum(EDIT_SHARES.values()))


def web_docs(
    parts: dict[str, list[Doc]], total: float, headlines: Sequence[str], seed: int
) -> list[Doc]:
    """Web-style documents for a pool of `total` characters, made from the parts' documents only.

    Each part gets near-duplicates and truncations of its own documents, `EDIT_SHARES` of its
    share of `total` each; boilerplate, shuffled words and spam split the web share equally.
    """
    docs = []
    for kind in EDITS:
        made: list[Doc] = []
        for part, bases in parts.items():
            if bases:
                rng = stage_rng(seed, f"{kind}:{part}")
                stream = _web_stream(kind, bases, headlines, rng, start=len(made))
                made += fill_budget_chars(stream, EDIT_SHARES[kind] * SHARES[part] * total)
        docs += made
    real = [d for bases in parts.values() for d in bases]
    for domain in WEB_DOMAINS:
        stream = _web_stream(domain.split("/")[1], real, headlines, stage_rng(seed, domain))
        docs += fill_budget_chars(stream, SHARES["web"] / len(WEB_DOMAINS) * total)
    return docs
