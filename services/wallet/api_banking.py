"""The wallet's banking RPCs: linked bank accounts, adding funds, cash-out,
and the bank partner's settlements. Mixed into ``WalletApi``."""

from __future__ import annotations

import asyncpg

from services.wallet.config import WalletSettings
from services.wallet.peers import Peers


class BankingApi:
    _pool: asyncpg.Pool
    _peers: Peers
    _settings: WalletSettings
