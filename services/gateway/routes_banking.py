"""Bank accounts, adding funds, cash-out and the bank partner's webhook over
HTTP."""

from fastapi import APIRouter

router = APIRouter()
