#!/usr/bin/env node
// A real OAuth 2.0 authorization server for passerelle's SMART Backend Services tests:
// node-oidc-provider (panva) with the client_credentials grant, `private_key_jwt` client
// authentication (the client's public key as a JWKS; the assertion's signature, iss, aud,
// exp and jti replay are checked by oidc-provider itself) and token introspection
// (RFC 7662) for the FHIR server that plays the resource server.
//
// Usage: SMART_AUTH_CONFIG='{...}' node server.mjs [port]   (port 0, the default: the system
// picks one)
// Prints `listening on 127.0.0.1:PORT` once it accepts requests. The issuer is
// `http://127.0.0.1:PORT`, the token endpoint `/token`, introspection `/token/introspection`.
// With SMART_AUTH_TLS_CERT and SMART_AUTH_TLS_KEY (PEM files) it serves HTTPS only, and the
// issuer is `https://127.0.0.1:PORT`.
//
// SMART_AUTH_CONFIG (JSON):
//   { "clients": [ { "client_id": "...", "public_key_pem": "-----BEGIN PUBLIC KEY-----...",
//                    "kid": "optional", "access_token_ttl_s": 300 } ],
//     "introspector": { "client_id": "...", "client_secret": "..." } }
// Each client may ask for the scopes `system/*.write`, `system/*.read` and
// `system/Bundle.write`; the introspector authenticates with client_secret_basic, and may
// get client_credentials tokens too.
//
// Test hooks (not OAuth):
//   GET  /test/stats?client_id=ID   -> `requests=N issued=M scope=S error=E` (token requests
//                                      that named the client, tokens issued, the last
//                                      granted scope and the last OAuth error code, `-` if none)
//   POST /test/revoke?client_id=ID  -> forgets every access token issued to the client (as a
//                                      server-side revocation would), answers `revoked=N`
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { createPublicKey } from 'node:crypto';
import Provider from 'oidc-provider';

const SCOPES = ['system/*.write', 'system/*.read', 'system/Bundle.write'];

const config = JSON.parse(process.env.SMART_AUTH_CONFIG);
const ttls = new Map();
const stats = new Map(); // client_id -> { requests, issued, scope, error }
function statsFor(id) {
  if (!stats.has(id)) stats.set(id, { requests: 0, issued: 0, scope: '-', error: '-' });
  return stats.get(id);
}

// A plain in-memory adapter (expiring entries), so that tokens can be listed and revoked.
const storage = new Map(); // `${model}:${id}` -> { payload, expiresAt }
class MapAdapter {
  constructor(model) {
    this.model = model;
  }
  key(id) {
    return `${this.model}:${id}`;
  }
  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    storage.set(this.key(id), { payload, expiresAt });
  }
  async find(id) {
    const entry = storage.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      storage.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }
  async findByUid() {
    return undefined;
  }
  async findByUserCode() {
    return undefined;
  }
  async consume(id) {
    const entry = storage.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }
  async destroy(id) {
    storage.delete(this.key(id));
  }
  async revokeByGrantId(grantId) {
    for (const [key, entry] of storage) {
      if (entry.payload.grantId === grantId) storage.delete(key);
    }
  }
}

const clients = config.clients.map((c) => {
  const jwk = createPublicKey(c.public_key_pem).export({ format: 'jwk' });
  if (c.kid) jwk.kid = c.kid;
  ttls.set(c.client_id, c.access_token_ttl_s ?? 300);
  return {
    client_id: c.client_id,
    token_endpoint_auth_method: 'private_key_jwt',
    jwks: { keys: [jwk] },
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: SCOPES.join(' '),
  };
});
clients.push({
  client_id: config.introspector.client_id,
  client_secret: config.introspector.client_secret,
  token_endpoint_auth_method: 'client_secret_basic',
  // It may also get tokens of its own (tests read the FHIR server with one).
  grant_types: ['client_credentials'],
  scope: SCOPES.join(' '),
  response_types: [],
  redirect_uris: [],
});

function assertionIssuer(assertion) {
  try {
    const payload = assertion.split('.')[1];
    return JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')).iss;
  } catch {
    return undefined;
  }
}

let handler = (req, res) => {
  res.writeHead(503);
  res.end();
};
const tls = process.env.SMART_AUTH_TLS_CERT
  ? { cert: fs.readFileSync(process.env.SMART_AUTH_TLS_CERT), key: fs.readFileSync(process.env.SMART_AUTH_TLS_KEY) }
  : null;
const server = tls
  ? https.createServer(tls, (req, res) => handler(req, res))
  : http.createServer((req, res) => handler(req, res));

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    clients,
    scopes: SCOPES,
    clientAuthMethods: ['private_key_jwt', 'client_secret_basic'],
    enabledJWA: {
      clientAuthSigningAlgValues: ['RS256', 'RS384', 'RS512', 'PS384', 'ES256', 'ES384'],
    },
    features: {
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Only the resource server may ask.
        allowedPolicy: (ctx, client) => client.clientId === config.introspector.client_id,
      },
      devInteractions: { enabled: false },
    },
    ttl: {
      ClientCredentials: (ctx, token, client) => ttls.get(client.clientId) ?? 300,
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));

  // Counts token requests per client, whatever their outcome.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path !== '/token' || ctx.method !== 'POST') return;
    const params = ctx.oidc && ctx.oidc.params;
    const id = (ctx.oidc && ctx.oidc.client && ctx.oidc.client.clientId)
      || (params && params.client_assertion && assertionIssuer(params.client_assertion))
      || '-';
    const s = statsFor(id);
    s.requests += 1;
    if (ctx.status === 200 && ctx.body && ctx.body.access_token) {
      s.issued += 1;
      s.scope = ctx.body.scope || '-';
    } else if (ctx.body && ctx.body.error) {
      s.error = ctx.body.error;
    }
  });

  const callback = provider.callback();
  handler = (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname === '/test/stats' && req.method === 'GET') {
      const s = statsFor(url.searchParams.get('client_id'));
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.end(`requests=${s.requests} issued=${s.issued} scope=${s.scope} error=${s.error}\n`);
      return;
    }
    if (url.pathname === '/test/revoke' && req.method === 'POST') {
      const id = url.searchParams.get('client_id');
      let revoked = 0;
      for (const [key, entry] of storage) {
        if (key.startsWith('ClientCredentials:') && entry.payload.clientId === id) {
          storage.delete(key);
          revoked += 1;
        }
      }
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.end(`revoked=${revoked}\n`);
      return;
    }
    callback(req, res);
  };
  console.log(`listening on 127.0.0.1:${port}`);
});
