"""`/docs` (Swagger UI) and `/redoc` with their scripts and styles served by this server.

FastAPI's own pages load them from a CDN, so on a machine without internet they are blank.
The files come from the `fastapi-offline` package (Swagger UI 5, which reads the OpenAPI 3.1
that FastAPI writes, and ReDoc 2); only the files are used, the pages are FastAPI's. They sit
behind the API key guard like every other path: a browser logged in sends its cookie with them.
"""

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

DOCS_PATH, REDOC_PATH = "/docs", "/redoc"
ASSETS_PATH = "/docs-assets"
ASSETS_DIR = files("fastapi_offline") / "static"


def install_docs(app: FastAPI) -> None:
    """The two pages and their files, on an app made with `docs_url=None, redoc_url=None`."""
    openapi_url = app.openapi_url
    assert openapi_url is not None, "the docs pages read the OpenAPI document"
    app.mount(ASSETS_PATH, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        """The OpenAPI document's URL and the files' folder, behind a proxy's prefix too."""
        root = request.scope.get("root_path", "")
        return root + openapi_url, root + ASSETS_PATH

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        spec, here = urls(request)
        return get_swagger_ui_html(
            openapi_url=spec, title=f"{app.title} - Swagger UI", swagger_js_url=f"{here}/swagger-ui-bundle.js",
            swagger_css_url=f"{here}/swagger-ui.css", swagger_favicon_url=f"{here}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        spec, here = urls(request)
        return get_redoc_html(openapi_url=spec, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{here}/redoc.standalone.js", redoc_favicon_url=f"{here}/favicon.png",
                              with_google_fonts=False)
