"""A LangChain document compressor backed by a rerankctl (or any Cohere-shaped) endpoint.

Needs only ``langchain-core`` (``pip install 'rerankctl[langchain]'``)::

    from langchain.retrievers import ContextualCompressionRetriever
    from reranker_ops.integrations.langchain import RerankerCompressor

    compressor = RerankerCompressor(base_url="http://127.0.0.1:8080", top_n=5,
                                    adjust=lambda doc, score: score * doc.metadata.get("boost", 1.0))
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=vector_store_retriever)

Documents keep their metadata (copied, never mutated), gain the score under ``score_key``, and come back
best first, cut to ``top_n``. ``adjust(document, score) -> score`` runs after scoring: the place for the
RAG system's metadata boosts; the adjusted score is what orders and what is stored.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from pydantic import ConfigDict, Field, PrivateAttr

from ..client import AsyncRerankerClient, Ranked, RerankerClient

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RerankerCompressor needs langchain-core: pip install 'rerankctl[langchain]'") from exc

Adjust = Callable[[Document, float], float]


class RerankerCompressor(BaseDocumentCompressor):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    base_url: str = "http://127.0.0.1:8080"
    api: str = "rerank"
    api_key: Optional[str] = None
    top_n: Optional[int] = 3
    timeout: float = 30.0
    max_retries: int = 3
    score_key: str = "relevance_score"
    raw_score_key: Optional[str] = "rerank_score"
    adjust: Optional[Adjust] = Field(default=None, exclude=True)

    _client: Optional[RerankerClient] = PrivateAttr(default=None)
    _aclient: Optional[AsyncRerankerClient] = PrivateAttr(default=None)

    def _kw(self) -> dict[str, Any]:
        return {"api": self.api, "api_key": self.api_key, "timeout": self.timeout, "max_retries": self.max_retries}

    @property
    def client(self) -> RerankerClient:
        if self._client is None:
            self._client = RerankerClient(self.base_url, **self._kw())
        return self._client

    @property
    def aclient(self) -> AsyncRerankerClient:
        if self._aclient is None:
            self._aclient = AsyncRerankerClient(self.base_url, **self._kw())
        return self._aclient

    def _assemble(self, documents: Sequence[Document], ranked: list[Ranked]) -> list[Document]:
        out = []
        for r in ranked:
            src = documents[r.index]
            doc = Document(page_content=src.page_content, metadata=dict(src.metadata), id=getattr(src, "id", None))
            score = float(r.score)
            if self.raw_score_key:
                doc.metadata[self.raw_score_key] = score
            if self.adjust is not None:
                score = float(self.adjust(doc, score))
            doc.metadata[self.score_key] = score
            out.append(doc)
        out.sort(key=lambda d: -d.metadata[self.score_key])
        return out[: self.top_n] if self.top_n is not None else out

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        if not documents:
            return []
        # Boosts can lift a document from below the cut, so the server ranks all of them when adjusting.
        ranked = self.client.rerank(query, [d.page_content for d in documents],
                                    top_k=None if self.adjust else self.top_n)
        return self._assemble(documents, ranked)

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        if not documents:
            return []
        ranked = await self.aclient.rerank(query, [d.page_content for d in documents],
                                           top_k=None if self.adjust else self.top_n)
        return self._assemble(documents, ranked)
