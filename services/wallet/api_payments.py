"""The wallet's merchant-payment and currency-exchange RPCs. Mixed into
``WalletApi``."""

from __future__ import annotations

import asyncpg

from services.wallet.config import WalletSettings
from services.wallet.peers import Peers


class PaymentsApi:
    _pool: asyncpg.Pool
    _peers: Peers
    _settings: WalletSettings
