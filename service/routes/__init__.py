"""Route modules of the gateway, one ``APIRouter`` each."""
