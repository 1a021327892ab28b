"""Synthetic dated news: fictional companies whose attributes change over time, with extractive questions.

Each entity is an invented company with a chief executive, a headquarters city, a flagship product, a head count and
partners. Its timeline holds 2–4 events between 2023 and 2025, at least 60 days apart (so never two in one month);
every event is one short article (one ``Document``, 40–90 words) that states the new value and usually the value it
replaces. Every article gets 1–3 questions whose answer is a span copied verbatim from it, and whose text names the
entity, the kind of event and its month, so the question singles out its article among all articles of the split.

Everything is a function of ``(split, seed)`` through one ``random.Random`` (the global generator is never used).
All invented names (company, product and city stems, person surnames) are assigned to one split by a hash of the
name, so train, validation and test never share an entity, a person, a product or a city, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random

from pipeline.data.portable import write_portable
from pipeline.schemas import Document, Question

SPLITS = ("train", "validation", "test")

_START = datetime(2023, 1, 1, tzinfo=UTC)
_DAYS = (datetime(2026, 1, 1, tzinfo=UTC) - _START).days  # 2023-01-01 .. 2025-12-31
_MIN_GAP_DAYS = 60  # two events of one entity never fall in the same month

_ONSETS = (
    "b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n",
    "p", "r", "s", "st", "t", "tr", "v", "z", "th", "sh", "j", "h",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ia", "ei")
_CODAS = ("n", "r", "s", "l", "x", "k", "m", "nd", "rn", "th")
_COMPANY_SUFFIXES = {
    "Dynamics": "engineering group",
    "Labs": "research company",
    "Systems": "software company",
    "Robotics": "robotics maker",
    "Foods": "food producer",
    "Biotech": "biotech firm",
    "Energy": "energy company",
    "Networks": "telecom operator",
    "Mobility": "electric vehicle maker",
    "Materials": "materials supplier",
    "Analytics": "data analytics firm",
    "Aerospace": "aerospace firm",
    "Logistics": "logistics company",
}
_CITY_SUFFIXES = ("holm", "port", "ford", "vik", "stad", "burg", "mouth", "field", "haven", "grad", "wick", "dale")
_PRODUCT_TAGS = ("", "", " Pro", " Max", " One", " Air", " X2", " 3", " Mini", " Prime")
_SOURCES = (
    "The Meridian Ledger",
    "Northgate Business Wire",
    "Harbor Street Journal",
    "Coastal Tech Report",
    "The Daily Quorum",
    "Vantage Markets News",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

# Article templates per event type; each is four sentences of 40–90 words once filled in.
_TEXTS: dict[str, tuple[str, ...]] = {
    "ceo": (
        "{E}, the {sector}, named {new} as chief executive on {date}. {new} succeeds {old}, who had led the company "
        "since its early years. The board said the change takes effect immediately and thanked {old} for years of "
        "steady work. {new} is expected to present a new strategy to investors within weeks.",
        "On {date}, {E} said {old} would step down as chief executive. The {sector} has appointed {new}, previously "
        "its head of operations, to the top job. Investors reacted calmly, and shares closed slightly higher after the "
        "announcement. The company said {old} will stay on as an adviser until the end of the year.",
        "{new} became chief executive of {E} on {date}, replacing {old}. Analysts said the {sector} needed fresh "
        "leadership after a slow year of flat sales. In a note to staff, {new} said the priority would be growth in "
        "new markets. The board did not say why {old} was leaving.",
    ),
    "hq": (
        "{E} is moving its headquarters from {old} to {new}, the {sector} announced on {date}. Hundreds of staff will "
        "relocate over the coming months. Executives cited lower costs and better transport links in {new} as the main "
        "reasons. The company will keep a small sales office in {old} for existing clients.",
        "On {date}, {E} confirmed it will leave {old} and base its headquarters in {new}. The {sector} said its new "
        "campus in {new} should open within a year. Local officials in {old} called the decision disappointing. Union "
        "representatives said they would seek guarantees for workers who cannot move.",
        "The {sector} {E} said on {date} that its head office has moved to {new}. The company had been based in {old} "
        "for most of its history. A spokesperson said the move brings it closer to key customers and suppliers. Some "
        "teams will keep working remotely during the transition.",
    ),
    "product": (
        "{E} launched the {new} on {date}, replacing the {old} as its flagship product. The {sector} will sell the "
        "{new} for {price}. Early reviewers praised its reliability, although some said the design changed little. "
        "The company expects the {new} to account for most of its sales next year.",
        "On {date}, {E} unveiled the {new}, the successor to the {old}. The {sector} said the {new} will be priced at "
        "{price} and will reach customers next month. Retailers expect strong demand before the holidays. The {old} "
        "will remain on sale at a discount until stocks run out.",
        "The {new} is the new flagship of {E}, the {sector} said on {date}. It costs {price} and takes over from the "
        "{old}, which sold well for several years. Orders open immediately through the company's partners. Analysts "
        "said the price was in line with rival products.",
    ),
    "earnings": (
        "{E} reported quarterly revenue of {revenue} on {date}. The {sector} now has {employees} employees, {trend} "
        "{old_employees} in its previous report. Its finance chief told analysts that demand remained solid across "
        "regions. The company kept its forecast for the full year unchanged.",
        "On {date}, {E} said revenue for the latest quarter reached {revenue}. The {sector} employs {employees} "
        "people, {trend} {old_employees} at the previous count. Executives told investors they expect steady "
        "results next year. Shares rose modestly after the report was released.",
        "The {sector} {E} posted {revenue} in quarterly revenue, according to results published on {date}. Its "
        "workforce stands at {employees} employees, {trend} {old_employees}. Shares moved little in early trading. "
        "Management said it would keep investing in research despite higher costs.",
    ),
    "partnership": (
        "{E} announced a partnership with {partner} on {date}. The deal, worth {deal}, covers joint research and "
        "shared manufacturing. Both companies said the first products from the agreement should appear next year. "
        "Regulators are not expected to object to the arrangement.",
        "On {date}, {E} and {partner} signed a {deal} agreement to work together. The {sector} said the partnership "
        "will help it reach new markets. Further terms of the arrangement were not disclosed by either side. Talks "
        "between the two companies began last year.",
        "The {sector} {E} has teamed up with {partner}, the companies said on {date}. Under the {deal} deal, "
        "{partner} will supply technology and engineering expertise. Industry analysts broadly welcomed the "
        "partnership. The agreement runs for an initial period of five years.",
    ),
}
_TITLES: dict[str, tuple[str, ...]] = {
    "ceo": ("{E} names {new} chief executive", "{old} steps down at {E}", "Leadership change at {E}"),
    "hq": ("{E} moves headquarters to {new}", "{E} to leave {old}", "{E} relocates its head office"),
    "product": ("{E} unveils the {new}", "{E} launches a new flagship", "{E} replaces the {old}"),
    "earnings": ("{E} reports quarterly results", "{E} revenue reaches {revenue}", "{E} updates investors"),
    "partnership": ("{E} partners with {partner}", "{E} signs {deal} deal", "{E} and {partner} join forces"),
}
# Question kinds per event type: (kind, answer field, templates). {when} is "Month YYYY" of the article.
_QUESTIONS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "ceo": (
        ("person", "new", (
            "Who did {E} name as chief executive in {when}?",
            "Who became chief executive of {E} in {when}?",
        )),
        ("person", "old", (
            "Who stepped down as chief executive of {E} in {when}?",
            "Which chief executive did {E} replace in {when}?",
        )),
    ),
    "hq": (
        ("city", "new", (
            "Where did {E} move its headquarters in {when}?",
            "To which city did {E} relocate its headquarters in {when}?",
        )),
        ("city", "old", ("Which city did {E} leave when it moved its headquarters in {when}?",)),
    ),
    "product": (
        ("product", "new", (
            "What product did {E} launch as its flagship in {when}?",
            "What is the name of the flagship product {E} unveiled in {when}?",
        )),
        ("product", "old", ("Which older product did the flagship {E} launched in {when} replace?",)),
        ("price", "price", (
            "What price did {E} set for the flagship it launched in {when}?",
            "How much does the product {E} launched in {when} cost?",
        )),
    ),
    "earnings": (
        ("revenue", "revenue", (
            "How much quarterly revenue did {E} report in {when}?",
            "What quarterly revenue did {E} announce in {when}?",
        )),
        ("employees", "employees", (
            "How many employees did {E} report having in {when}?",
            "How many people did {E} employ according to its {when} results?",
        )),
    ),
    "partnership": (
        ("company", "partner", (
            "Which company did {E} announce a partnership with in {when}?",
            "Who did {E} team up with in {when}?",
        )),
        ("deal", "deal", ("How much is the partnership {E} announced in {when} worth?",)),
    ),
}
_EVENTS = tuple(_TEXTS)

# The "other" style's templates: the same five events and answer fields, written differently (dates as "14 March
# 2024", the news first or last, other verbs), with other question wordings.
_O_TEXTS: dict[str, tuple[str, ...]] = {
    "ceo": (
        "Boardroom shake-up: as of {date}, {E} is run by {new}. The outgoing boss, {old}, leaves after a long tenure "
        "at the {sector}. People close to the company described the handover as orderly. {new} told reporters the "
        "first hundred days would be spent listening to customers and staff.",
        "{old} has handed the reins of {E} to {new}, a filing dated {date} shows. The {sector} gave no reason for the "
        "switch. Several senior managers are expected to follow {old} out of the door. Observers will watch whether "
        "{new} keeps the current dividend policy.",
    ),
    "hq": (
        "After years in {old}, the {sector} {E} is packing up for {new}. The relocation, disclosed on {date}, affects "
        "most head-office roles. Property costs in {old} had risen sharply, a company memo said. Moving firms have "
        "already been hired for the transfer to {new}.",
        "{new} will be the new home of {E}. In a statement published {date}, the {sector} said it would wind down its "
        "offices in {old} by next spring. Regional leaders in {new} welcomed the jobs. Staff were offered relocation "
        "packages or redundancy terms.",
    ),
    "product": (
        "Meet the {new}: {E} put its new flagship on sale on {date}, retiring the {old}. The {sector} lists the {new} "
        "at {price}. Distributors reported brisk pre-orders. Critics noted the battery life but questioned the "
        "build quality of early units.",
        "The {old} is being phased out. On {date} the {sector} {E} introduced the {new} as its lead product, with a "
        "sticker price of {price}. Shipments start in stages across regions. The company promised software updates "
        "for owners of the {old} for two more years.",
    ),
    "earnings": (
        "Quarterly figures released {date} put revenue at {E} at {revenue}. Headcount at the {sector} stood at "
        "{employees}, compared with {old_employees} a quarter earlier. Management flagged currency swings as a risk. "
        "No change was made to the outlook for the year.",
        "{E} booked {revenue} of revenue in the quarter, the {sector} disclosed on {date}. It counted {employees} "
        "staff on the payroll, against {old_employees} before. Margins narrowed slightly on higher input costs. The "
        "results were broadly in line with market expectations.",
    ),
    "partnership": (
        "{E} and {partner} have struck a deal valued at {deal}, both sides confirmed on {date}. The tie-up pools "
        "their distribution networks in three regions. The {sector} said integration work starts at once. Neither "
        "company expects job cuts from the agreement.",
        "A {deal} alliance with {partner} was unveiled by {E} on {date}. The {sector} will contribute plants and "
        "staff, while {partner} brings its patents. The pact is set to last seven years. Competitors declined to "
        "comment on the announcement.",
    ),
}
_O_TITLES: dict[str, tuple[str, ...]] = {
    "ceo": ("New boss at {E}", "{new} takes charge of {E}"),
    "hq": ("{E} heads for {new}", "{E} quits {old}"),
    "product": ("{E} retires the {old}", "Meet the {new}"),
    "earnings": ("{E} quarterly figures", "{E} books {revenue}"),
    "partnership": ("{E} allies with {partner}", "{E} strikes {deal} pact"),
}
_O_QUESTIONS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "ceo": (
        ("person", "new", ("In {when}, who took over the running of {E}?", "Who was put in charge of {E} in {when}?")),
        ("person", "old", ("Which boss left {E} in {when}?",)),
    ),
    "hq": (
        ("city", "new", ("In {when}, {E} relocated its head office to which place?", "Where is {E} moving to, "
                                                                                    "according to news from {when}?")),
        ("city", "old", ("Which place was {E} leaving, per its {when} relocation news?",)),
    ),
    "product": (
        ("product", "new", ("What flagship did {E} put on sale in {when}?", "Name the lead product {E} introduced in "
                                                                            "{when}.")),
        ("product", "old", ("Which product did {E} retire in {when}?",)),
        ("price", "price", ("At what price is the flagship {E} introduced in {when} listed?",)),
    ),
    "earnings": (
        ("revenue", "revenue", ("What revenue did {E} book for the quarter reported in {when}?",)),
        ("employees", "employees", ("What was the headcount of {E} in its {when} figures?",)),
    ),
    "partnership": (
        ("company", "partner", ("With which firm did {E} strike a deal in {when}?",)),
        ("deal", "deal", ("What was the value of the alliance {E} unveiled in {when}?",)),
    ),
}
_AWKWARD = re.compile(r"(.)\1|[^aeiouy]{3}|[aeiouy]{3}")  # doubled letters, consonant or vowel pile-ups


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


class _Namer:
    """Invents names for one split. Every name word (company, product and city stem, surname) is owned by the split
    its hash falls in, and no word is a substring of another, so an answer never hides inside a question's entity."""

    onsets, vowels, codas, awkward = _ONSETS, _VOWELS, _CODAS, _AWKWARD
    company_suffixes = _COMPANY_SUFFIXES

    def __init__(self, rng: Random, split: str) -> None:
        self.rng = rng
        self.bucket = _split_index(split)
        self.words: set[str] = set()
        self.pieces: set[str] = set()  # every substring (>= 3 chars) of a claimed word

    def _syllables(self, n: int) -> str:
        """``n`` onset-vowel syllables; codas are rare inside the word and common at its end."""
        word = ""
        for i in range(n):
            word += self.rng.choice(self.onsets) + self.rng.choice(self.vowels)
            if self.rng.random() < (0.6 if i == n - 1 else 0.25):
                word += self.rng.choice(self.codas)
        return word

    def _claim(self, make: Callable[[], str]) -> str:
        while True:
            word = make()
            subs = {word[i:j] for i in range(len(word)) for j in range(i + 3, len(word) + 1)}
            if (
                self.awkward.search(word)
                or int(hashlib.sha256(word.encode()).hexdigest(), 16) % len(SPLITS) != self.bucket
                or word in self.pieces
                or not subs.isdisjoint(self.words)
            ):
                continue
            self.words.add(word)
            self.pieces |= subs
            return word.capitalize()

    def company(self) -> str:
        stem = self._claim(lambda: self._syllables(self.rng.choice((2, 2, 3))))
        return f"{stem} {self.rng.choice(list(_COMPANY_SUFFIXES))}"

    def person(self) -> str:
        first = ""
        while not first or _AWKWARD.search(first):
            first = self._syllables(1) + self.rng.choice(("a", "o", "en", "el", "ia", "is", "an", "ah", "ine"))
        return f"{first.capitalize()} {self._claim(lambda: self._syllables(2))}"

    def city(self) -> str:
        return self._claim(lambda: self._syllables(self.rng.choice((1, 2))) + self.rng.choice(_CITY_SUFFIXES))

    def product(self) -> str:
        return self._claim(lambda: self._syllables(2)) + self.rng.choice(_PRODUCT_TAGS)

    # numbers, as this style writes them
    def money(self, millions: int) -> str:
        return _money(millions)

    def price(self) -> str:
        return f"${self.rng.randrange(5, 200) * 5 - 1}"


def _money(millions: int) -> str:
    return f"${millions} million"


# ---- the "other" style: a second style the project writes and never trains on ----------------------------------
# Other sounds (onsets, vowels and codas the house style never uses), longer names in several pieces (three-part
# person names with a hyphenated surname, two-word company stems and cities, product codes with digits), other
# number formats (euros, "bn") and other article and question templates.
_O_ONSETS = ("c", "ch", "qu", "w", "y", "kh", "ts", "pl", "fl", "bj", "gw", "v", "m", "l", "n", "s")
_O_VOWELS = ("ou", "ay", "oa", "ue", "au", "eo", "i", "u", "o", "a")
_O_CODAS = ("ck", "sk", "ng", "tz", "lt", "ff", "p", "x")
_O_AWKWARD = re.compile(r"(.)\1\1|[^aeiouy]{4}|[aeiouy]{4}")  # triples and long pile-ups only
_O_COMPANY_SUFFIXES = {
    "Holdings": "holding group",
    "Works": "machine builder",
    "Collective": "design collective",
    "Freight": "shipping line",
    "Pharma": "drug maker",
    "Grid": "power utility",
    "Studios": "media studio",
    "Mining": "mining concern",
    "Textiles": "textile maker",
    "Instruments": "instrument maker",
}
_O_CITY_PARTS = (("Port ", ""), ("", " Sands"), ("New ", ""), ("", " Crossing"), ("Lake ", ""), ("", " Heights"))
_O_CODE_LETTERS = "BCDFGHKLMNPQRSTVWXZ"


class _OtherNamer(_Namer):
    onsets, vowels, codas, awkward = _O_ONSETS, _O_VOWELS, _O_CODAS, _O_AWKWARD
    company_suffixes = _O_COMPANY_SUFFIXES

    def company(self) -> str:
        stems = [self._claim(lambda: self._syllables(2)) for _ in range(self.rng.choice((1, 2, 2)))]
        return f"{' '.join(stems)} {self.rng.choice(list(_O_COMPANY_SUFFIXES))}"

    def person(self) -> str:
        first = self._claim(lambda: self._syllables(self.rng.choice((2, 3))))
        return f"{first} {self._claim(lambda: self._syllables(2))}-{self._claim(lambda: self._syllables(2))}"

    def city(self) -> str:
        before, after = self.rng.choice(_O_CITY_PARTS)
        return before + self._claim(lambda: self._syllables(self.rng.choice((2, 3)))) + after

    def product(self) -> str:
        code = "".join(self.rng.choice(_O_CODE_LETTERS) for _ in range(2)) + f"-{self.rng.randrange(100, 9999)}"
        return f"{self._claim(lambda: self._syllables(2))} {code}"

    def money(self, millions: int) -> str:
        return f"€{millions / 1000:.2f} bn" if millions >= 500 else f"€{millions}.{self.rng.randrange(10)} million"

    def price(self) -> str:
        return f"€{self.rng.randrange(20, 900)}.{self.rng.choice(('00', '50', '95', '99'))}"


def _employees(rng: Random) -> int:
    return rng.randrange(30, 6000) * 10


def _fresh_value(kind: str, rng: Random, namer: _Namer) -> str:
    """A new value of one answer kind; used for distractors when the split holds too few of that kind."""
    if kind == "person":
        return namer.person()
    if kind == "city":
        return namer.city()
    if kind == "product":
        return namer.product()
    if kind == "company":
        return namer.company()
    if kind == "price":
        return namer.price()
    if kind == "revenue":
        return namer.money(rng.randrange(12, 980))
    if kind == "employees":
        return f"{_employees(rng):,}"
    if kind == "deal":
        return namer.money(rng.randrange(5, 240))
    raise ValueError(f"unknown answer kind {kind!r}")


@dataclass
class _Article:
    doc: Document
    entity: str
    event: str
    fields: dict[str, str]
    when: str  # "Month YYYY", as the questions name it


@dataclass
class _Entity:
    name: str
    ceo: str
    hq: str
    product: str
    employees: int
    values: dict[str, set[str]] = field(default_factory=dict)  # answer kind -> every value this entity ever had


def _event_dates(rng: Random, n: int) -> list[datetime]:
    while True:
        days = sorted(rng.sample(range(_DAYS), n))
        if all(b - a >= _MIN_GAP_DAYS for a, b in zip(days, days[1:])):
            minutes = (0, 15, 30, 45)
            return [_START + timedelta(days=d, hours=rng.randrange(6, 20), minutes=rng.choice(minutes)) for d in days]


def _event_fields(event: str, ent: _Entity, rng: Random, namer: _Namer) -> dict[str, str]:
    """Advance the entity's state by one event and return the facts the article states."""
    if event == "ceo":
        fields = {"old": ent.ceo, "new": namer.person()}
        ent.ceo = fields["new"]
    elif event == "hq":
        fields = {"old": ent.hq, "new": namer.city()}
        ent.hq = fields["new"]
    elif event == "product":
        fields = {"old": ent.product, "new": namer.product(), "price": _fresh_value("price", rng, namer)}
        ent.product = fields["new"]
    elif event == "earnings":
        new = ent.employees
        while new == ent.employees:
            new = max(300, round(ent.employees * rng.uniform(0.75, 1.35) / 10) * 10)
        fields = {
            "revenue": _fresh_value("revenue", rng, namer),
            "employees": f"{new:,}",
            "old_employees": f"{ent.employees:,}",
            "trend": "up from" if new > ent.employees else "down from",
        }
        ent.employees = new
    else:
        fields = {"partner": namer.company(), "deal": _fresh_value("deal", rng, namer)}
    return fields


@dataclass(frozen=True)
class _Style:
    namer: type[_Namer]
    texts: dict[str, tuple[str, ...]]
    titles: dict[str, tuple[str, ...]]
    questions: dict
    date: str  # format of an article's date, with {month}, {day}, {year}
    prefix: str  # of document ids: syn-<prefix><split>-...


# "house": the style the checkpoints train on (the default, unchanged); "other": never trained on
STYLES = {"house": _Style(_Namer, _TEXTS, _TITLES, _QUESTIONS, "{month} {day}, {year}", ""),
          "other": _Style(_OtherNamer, _O_TEXTS, _O_TITLES, _O_QUESTIONS, "{day} {month} {year}", "other-")}


def _style(name: str) -> _Style:
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; expected one of {list(STYLES)}")
    return STYLES[name]


def _articles(split: str, n_entities: int, rng: Random, namer: _Namer,
              style: _Style = STYLES["house"]) -> tuple[list[_Article], list[_Entity]]:
    articles: list[_Article] = []
    entities: list[_Entity] = []
    for e in range(n_entities):
        ent = _Entity(namer.company(), namer.person(), namer.city(), namer.product(), _employees(rng))
        entities.append(ent)
        sector = namer.company_suffixes[ent.name.rsplit(" ", 1)[1]]
        dates = _event_dates(rng, rng.randint(2, 4))
        for a, when in enumerate(dates):
            event = rng.choice(_EVENTS)
            fields = _event_fields(event, ent, rng, namer)
            month = _MONTHS[when.month - 1]
            date = style.date.format(month=month, day=when.day, year=when.year)
            slots = {**fields, "E": ent.name, "sector": sector, "date": date}
            text = rng.choice(style.texts[event]).format(**slots)
            title = rng.choice(style.titles[event]).format(**slots)
            doc_id = f"syn-{style.prefix}{split}-e{e:04d}-a{a}"
            slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
            source = rng.choice(_SOURCES)
            doc = Document(
                id=doc_id,
                text=text,
                title=title,
                published_at=when,
                source=source,
                url=f"https://news.example/{when:%Y/%m/%d}/{slug}-{doc_id}",
            )
            articles.append(_Article(doc, ent.name, event, fields, f"{month} {when.year}"))
            for kind, key, _ in style.questions[event]:
                ent.values.setdefault(kind, set()).add(fields[key])
    return articles, entities


def _choices(gold: str, kind: str, own: set[str], pool: list[str], rng: Random, namer: _Namer) -> list[str]:
    """The gold plus three same-kind distractors (up to two from the entity's own history first), shuffled."""
    taken = {gold}
    distractors: list[str] = []
    for candidates in (rng.sample(sorted(own), len(own))[:2], rng.sample(pool, min(len(pool), 12))):
        for c in candidates:
            if len(distractors) < 3 and c not in taken:
                taken.add(c)
                distractors.append(c)
    while len(distractors) < 3:
        c = _fresh_value(kind, rng, namer)
        if c not in taken:
            taken.add(c)
            distractors.append(c)
    options = [gold, *distractors]
    rng.shuffle(options)
    return options


def generate(split: str, n_entities: int, seed: int = 0, style: str = "house") -> tuple[list[Document], list[Question]]:
    """Documents and questions of one split, grouped by entity in timeline order; deterministic in
    ``(split, seed, style)``.

    Document ids are ``syn-<split>-e<entity>-a<article>`` (``syn-other-<split>-...`` in the other style); question
    ids append ``-q<k>``. Every question has ``answers=[span]`` with the span verbatim in its only gold document,
    ``doc_ids=[that document]``, four ``choices`` (the gold and three same-kind distractors of the split) and an
    ``asked_at`` after the article. ``style``: ``"house"`` (the one checkpoints train on; the default, unchanged) or
    ``"other"`` (other templates, other name sounds, longer multi-piece names, product codes with digits, euro
    amounts: a style the project never trains on, to measure what carries over).
    """
    st = _style(style)
    rng = Random(f"macstream-synthetic:{split}:{seed}" if style == "house"
                 else f"macstream-synthetic:{style}:{split}:{seed}")
    namer = st.namer(rng, split)
    articles, entities = _articles(split, n_entities, rng, namer, st)
    own = {ent.name: ent.values for ent in entities}
    pools: dict[str, list[str]] = {}
    for ent in entities:
        for kind, values in ent.values.items():
            pools.setdefault(kind, []).extend(sorted(values))
    questions: list[Question] = []
    for art in articles:
        kinds = st.questions[art.event]
        for q, (kind, key, templates) in enumerate(rng.sample(kinds, rng.randint(1, min(3, len(kinds))))):
            gold = art.fields[key]
            text = rng.choice(templates).format(E=art.entity, when=art.when)
            assert gold in art.doc.text and gold.lower() not in text.lower(), (art.doc.id, gold, text)
            questions.append(
                Question(
                    id=f"{art.doc.id}-q{q}",
                    question=text,
                    answers=[gold],
                    doc_ids=[art.doc.id],
                    choices=_choices(gold, kind, own[art.entity][kind] - {gold}, pools[kind], rng, namer),
                    asked_at=art.doc.published_at + timedelta(days=rng.randint(1, 90)),
                )
            )
    return [a.doc for a in articles], questions


def stream(split: str, n_entities: int, seed: int = 0) -> list[Document]:
    """The split's documents in publication order (ties by id), as a news stream would deliver them."""
    documents, _ = generate(split, n_entities, seed)
    return sorted(documents, key=lambda d: (d.published_at, d.id))


def write_synthetic(out_dir: str | Path, split: str, n_entities: int, seed: int = 0, style: str = "house") -> Path:
    """Generate one split and write it in the portable format (``documents.jsonl``, ``questions.jsonl``)."""
    documents, questions = generate(split, n_entities, seed, style)
    return write_portable(out_dir, documents, questions)
