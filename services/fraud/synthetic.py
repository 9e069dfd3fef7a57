"""A seeded synthetic payment history, for a cold start and for measuring.

Normal users pay their usual payees and shops, in their waking hours, from
their own one or two devices, at home, amounts around their own typical
value; now and then they travel, change phones, pay someone new, make a large
purchase or split a bill in a burst. Fraud comes in four patterns:

- ``account_takeover``: an attacker on a new device, usually abroad and at
  night, drains the account in a burst to one to three new recipients;
- ``mule``: victims of a scam each pay a mule account they never paid
  before; a mule receives from many payers in a day (some mules are flagged);
- ``large_transfer``: one transfer of 30 to 200 times the typical amount to
  a new payee;
- ``new_device_country``: a new device in a new, distant country hours after
  a payment at home.

Each transaction comes with the ``History`` the velocity store would have
answered for it (``MemoryVelocityStore`` does in memory what the Redis script
does), so the rules and the model see exactly what the service would.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.fraud.domain import (
    DEFAULT_RULES,
    History,
    RecipientKind,
    Rules,
    Transaction,
)

START = 1_735_689_600.0  # 2025-01-01T00:00:00Z
DAY = 86_400.0
HOME_COUNTRIES = {
    "US": (39.0, -98.0), "GB": (53.0, -1.5), "DE": (51.0, 10.0), "FR": (46.5, 2.5),
    "ES": (40.0, -3.7), "IT": (42.5, 12.5), "NL": (52.2, 5.3), "PL": (52.0, 19.5),
}  # fmt: skip
ABROAD = {
    **HOME_COUNTRIES,
    "BR": (-15.8, -47.9), "NG": (9.1, 7.4), "RU": (55.8, 37.6), "IN": (28.6, 77.2),
    "CN": (39.9, 116.4), "JP": (35.7, 139.7), "AE": (25.2, 55.3), "MX": (19.4, -99.1),
    "ZA": (-26.2, 28.0), "SG": (1.35, 103.8),
}  # fmt: skip


@dataclass(frozen=True)
class Labelled:
    tx: Transaction
    history: History
    flagged: bool
    fraud: bool
    pattern: str


@dataclass
class _User:
    user_id: uuid.UUID
    country: str
    home: tuple[float, float]
    devices: list[str]
    typical: float  # minor units
    rate: float  # transactions a day
    payees: list[tuple[RecipientKind, str]]
    located: bool  # shares location (the mobile app)


@dataclass(order=True)
class _Event:
    at: float
    user: _User = field(compare=False)
    amount: int = field(compare=False)
    recipient: tuple[RecipientKind, str] = field(compare=False)
    device: str = field(compare=False)
    country: str = field(compare=False)
    location: tuple[float, float] | None = field(compare=False)
    fraud: bool = field(compare=False, default=False)
    pattern: str = field(compare=False, default="normal")


class _Generator:
    def __init__(self, seed: int, users: int, days: float) -> None:
        self.rng = random.Random(seed)  # noqa: S311 (a seeded simulation)
        self.days = days
        self.merchants = [
            (RecipientKind.MERCHANT, str(self.uuid())) for _ in range(max(20, users // 10))
        ]
        self.users = [self.user() for _ in range(users)]
        for u in self.users:
            friends = self.rng.sample(self.users, min(len(self.users), self.rng.randint(2, 6)))
            u.payees += [(RecipientKind.USER, str(f.user_id)) for f in friends if f is not u]
        self.events: list[_Event] = []
        self.flagged: set[str] = set()

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def user(self) -> _User:
        rng = self.rng
        country = rng.choice(list(HOME_COUNTRIES))
        lat, lon = HOME_COUNTRIES[country]
        devices = [f"dev-{self.uuid().hex[:12]}" for _ in range(1 + (rng.random() < 0.3))]
        return _User(
            user_id=self.uuid(), country=country,
            home=(lat + rng.uniform(-2, 2), lon + rng.uniform(-2, 2)), devices=devices,
            typical=math.exp(rng.gauss(8.0, 0.9)),  # median about 30.00
            rate=math.exp(rng.gauss(0.0, 0.6)), payees=rng.sample(self.merchants, 6),
            located=rng.random() < 0.7,
        )  # fmt: skip

    def waking(self, user: _User, day: float) -> float:
        """A time on that day in the user's waking hours (07:00 to 23:00 local)."""
        local = self.rng.triangular(7, 23, 15)
        return START + day * DAY + ((local - user.home[1] / 15) % 24) * 3600

    def night(self, user: _User, day: float) -> float:
        local = self.rng.uniform(0.5, 5.5)
        return START + day * DAY + ((local - user.home[1] / 15) % 24) * 3600

    def amount(self, user: _User, factor: float = 1.0) -> int:
        return max(100, round(user.typical * factor * math.exp(self.rng.gauss(0, 0.5))))

    def at_home(self, user: _User) -> tuple[float, float] | None:
        if not user.located:
            return None
        return (user.home[0] + self.rng.gauss(0, 0.05), user.home[1] + self.rng.gauss(0, 0.05))

    def event(self, user: _User, at: float, amount: int, **kw: object) -> None:
        values: dict[str, object] = {
            "recipient": self.rng.choice(user.payees),
            "device": user.devices[0] if self.rng.random() < 0.9 else self.rng.choice(user.devices),
            "country": user.country,
            "location": self.at_home(user),
            **kw,
        }
        self.events.append(_Event(at, user, amount, **values))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- normal life

    def normal(self, user: _User) -> None:
        rng = self.rng
        trip = None
        if rng.random() < 0.05:  # a trip abroad, flying there at a plausible speed
            first = rng.uniform(2, self.days - 3)
            trip = (first, first + rng.uniform(2, 7), rng.choice(list(ABROAD)))
        day = rng.expovariate(user.rate)
        while day < self.days:
            at = self.waking(user, math.floor(day))
            kw: dict[str, object] = {}
            roll = rng.random()
            if roll < 0.02:  # a new phone, kept from now on
                user.devices.insert(0, f"dev-{self.uuid().hex[:12]}")
            elif roll < 0.17:  # somebody new: a shop or a friend
                new = (
                    rng.choice(self.merchants)
                    if rng.random() < 0.6
                    else (RecipientKind.USER, str(rng.choice(self.users).user_id))
                )
                user.payees.append(new)
                kw["recipient"] = new
            factor = rng.uniform(8, 25) if rng.random() < 0.015 else 1.0  # a large purchase
            if trip and trip[0] <= day < trip[1]:
                lat, lon = ABROAD[trip[2]]
                kw["country"] = trip[2]
                kw["location"] = (lat, lon) if user.located else None
            self.event(user, at, self.amount(user, factor), **kw)
            if rng.random() < 0.001:  # splitting a bill: a burst to friends
                for i in range(rng.randint(5, 9)):
                    self.event(user, at + 20 + i * rng.uniform(3, 9), self.amount(user, 0.5),
                               pattern="bill_split")  # fmt: skip
            day += rng.expovariate(user.rate)

    # ---------------------------------------------------------------- fraud

    def account_takeover(self, user: _User) -> None:
        rng = self.rng
        day = rng.uniform(1, self.days - 1)
        at = self.night(user, math.floor(day)) if rng.random() < 0.7 else self.waking(user, day)
        device = f"atk-{self.uuid().hex[:12]}"
        abroad = rng.random() < 0.75
        country = rng.choice(["NG", "RU", "BR", "IN", "CN", "MX"]) if abroad else user.country
        lat, lon = ABROAD[country]
        # Fresh mule accounts, or accounts of real users taken over before.
        mules = [
            (RecipientKind.USER, str(self.uuid() if rng.random() < 0.6 else
                                     rng.choice(self.users).user_id))
            for _ in range(rng.randint(1, 3))
        ]  # fmt: skip
        for i in range(rng.randint(4, 14)):
            self.event(user, at + i * rng.uniform(5, 50), self.amount(user, rng.uniform(2, 15)),
                       recipient=rng.choice(mules), device=device, country=country,
                       location=(lat, lon) if abroad and rng.random() < 0.8 else None,
                       fraud=True, pattern="account_takeover")  # fmt: skip

    def mule_ring(self) -> None:
        rng = self.rng
        mule = (RecipientKind.USER, str(self.uuid()))
        if rng.random() < 0.3:
            self.flagged.add(mule[1])
        day = rng.uniform(0, self.days - 1)
        if rng.random() < 0.4:  # an aged mule: paid now and then for weeks before
            for payer in rng.sample(self.users, 3):
                self.event(payer, START + rng.uniform(0, max(day - 1, 0.1)) * DAY,
                           self.amount(payer), recipient=mule)  # fmt: skip
        for victim in rng.sample(self.users, rng.randint(4, 16)):
            at = START + (day + rng.uniform(0, 1)) * DAY
            for _ in range(rng.randint(1, 2)):
                self.event(victim, at, self.amount(victim, rng.uniform(2, 20)), recipient=mule,
                           fraud=True, pattern="mule")  # fmt: skip
                at += rng.uniform(60, 3600)

    def large_transfer(self, user: _User) -> None:
        rng = self.rng
        day = rng.uniform(1, self.days)
        kw: dict[str, object] = {"recipient": (RecipientKind.USER, str(self.uuid()))}
        if rng.random() < 0.5:
            kw["device"] = f"atk-{self.uuid().hex[:12]}"
        self.event(user, self.waking(user, math.floor(day)), self.amount(user, rng.uniform(30, 200)),
                   fraud=True, pattern="large_transfer", **kw)  # fmt: skip

    def new_device_country(self, user: _User) -> None:
        rng = self.rng
        day = math.floor(rng.uniform(1, self.days))
        home = self.waking(user, day)
        self.event(user, home, self.amount(user))
        country = rng.choice([c for c in ABROAD if c != user.country and c not in HOME_COUNTRIES])
        lat, lon = ABROAD[country]
        device = f"atk-{self.uuid().hex[:12]}"
        recipient = (RecipientKind.USER, str(self.uuid())) if rng.random() < 0.5 else None
        for i in range(rng.randint(1, 2)):
            self.event(user, home + rng.uniform(600, 4 * 3600) + i * 300,
                       self.amount(user, rng.uniform(1, 6)), device=device, country=country,
                       location=(lat, lon) if rng.random() < 0.8 else None,
                       fraud=True, pattern="new_device_country",
                       **({"recipient": recipient} if recipient else {}))  # fmt: skip


def generate(seed: int = 7, users: int = 2000, days: float = 30.0) -> list[Labelled]:
    """Every transaction of the simulated period in time order, labelled."""
    g = _Generator(seed, users, days)
    for user in g.users:
        g.normal(user)
    for user in g.users:
        roll = g.rng.random()
        if roll < 0.010:
            g.account_takeover(user)
        elif roll < 0.025:
            g.large_transfer(user)
        elif roll < 0.040:
            g.new_device_country(user)
    for _ in range(max(1, users // 100)):
        g.mule_ring()
    g.events.sort()
    store = MemoryVelocityStore(DEFAULT_RULES)
    out = []
    for e in g.events:
        kind, recipient = e.recipient
        tx = Transaction(
            transaction_id=g.uuid(), user_id=e.user.user_id,
            type="P2P_OUT" if kind is RecipientKind.USER else "MERCHANT_PAYMENT",
            amount=e.amount, currency="USD", at=e.at, recipient_kind=kind,
            recipient_id=recipient, device_id=e.device, country=e.country, location=e.location,
        )  # fmt: skip
        out.append(Labelled(tx, store.observe(tx), recipient in g.flagged, e.fraud, e.pattern))
    return out


class MemoryVelocityStore:
    """What the Redis script (``store.OBSERVE``) answers, in memory, for
    transactions arriving in time order with distinct ids."""

    def __init__(self, rules: Rules = DEFAULT_RULES) -> None:
        self.rules = rules
        self._times: dict[tuple[uuid.UUID, int], deque[float]] = {}
        self._amounts: dict[tuple[uuid.UUID, str], deque[int]] = {}
        self._devices: dict[uuid.UUID, set[str]] = {}
        self._countries: dict[uuid.UUID, set[str]] = {}
        self._location: dict[uuid.UUID, tuple[float, float, float]] = {}
        self._payees: dict[uuid.UUID, set[str]] = {}
        self._since: dict[str, float] = {}
        self._payers: dict[str, dict[uuid.UUID, float]] = {}

    def _count(self, user: uuid.UUID, window: int, at: float) -> int:
        times = self._times.setdefault((user, window), deque())
        while times and times[0] <= at - window:
            times.popleft()
        times.append(at)
        return len(times)

    @staticmethod
    def _novelty(known: set[str], value: str) -> tuple[bool | None, int]:
        count = len(known)
        if not value:
            return None, count
        seen = value in known
        known.add(value)
        return seen, count

    def observe(self, tx: Transaction) -> History:
        r, user = self.rules, tx.user_id
        velocity = (self._count(user, r.short_window_seconds, tx.at),
                    self._count(user, r.long_window_seconds, tx.at))  # fmt: skip
        amounts = self._amounts.setdefault(
            (user, tx.currency), deque(maxlen=r.typical_amounts_kept)
        )
        recent = tuple(amounts)
        amounts.appendleft(tx.amount)
        device = self._novelty(self._devices.setdefault(user, set()), tx.device_id)
        country = self._novelty(self._countries.setdefault(user, set()), tx.country)
        last = self._location.get(user)
        if tx.location is not None:
            self._location[user] = (*tx.location, tx.at)
        payee = self._novelty(self._payees.setdefault(user, set()), tx.recipient_id)
        since, payers = None, 1
        if tx.recipient_kind is RecipientKind.USER and tx.recipient_id:
            since = self._since.get(tx.recipient_id)
            if since is None:
                self._since[tx.recipient_id] = tx.at
            seen = self._payers.setdefault(tx.recipient_id, {})
            seen[user] = tx.at
            for payer in [p for p, t in seen.items() if t <= tx.at - r.recipient_window_seconds]:
                del seen[payer]
            payers = len(seen)
        return History(
            velocity=velocity, recent_amounts=recent, device_known=device[0],
            devices_known=device[1], country_known=country[0], countries_known=country[1],
            last_location=last, payee_known=payee[0], recipient_since=since,
            recipient_payers=payers,
        )  # fmt: skip


def patterns(rows: list[Labelled]) -> Iterator[tuple[str, int, int]]:
    """Each pattern with its count of transactions and of fraud."""
    names = sorted({r.pattern for r in rows})
    for name in names:
        of = [r for r in rows if r.pattern == name]
        yield name, len(of), sum(r.fraud for r in of)
