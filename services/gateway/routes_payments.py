"""Merchants, merchant payments and currency exchange over HTTP."""

from fastapi import APIRouter

router = APIRouter()
