// Real OIDC provider for the guarita test suite (see tests/support/oidc.py).
//
//   node provider.mjs [PORT]        PORT or env OIDC_PORT; 0 (default) = ephemeral
//
// Env:
//   OIDC_CLIENTS    JSON list of {client_id, client_secret, groups, email, extra}
//                   (client_credentials clients; groups/email/extra go into the access token)
//   OIDC_USERS      optional JSON list of {sub, groups, email, extra}: claims for tokens issued
//                   to a logged-in user (device flow), keyed by the login name typed at /interaction
//   OIDC_AUDIENCE   "aud" of access tokens (default "guarita")
//   OIDC_TOKEN_TTL  access-token lifetime in seconds (default 600)
//   OIDC_JWKS_FILE  optional JWKS with private keys; the first RS256-capable key signs
//   OIDC_DEVICE_CLIENT_ID  public device-flow client (default "bastion-cli")
//   OIDC_WEB_CLIENTS  optional JSON list of {client_id, redirect_uris}: public browser clients
//                   (authorization code with PKCE, e.g. the guarita console); a user signs in at
//                   the dev interactions form with any login (the token's sub) and any password
//   OIDC_DEVICE_INTERVAL   optional polling interval (s) announced in device authorization responses
//                   (oidc-provider announces none, so clients fall back to RFC 8628's 5 s)
//
// A client may carry "ttl" (seconds): the lifetime of its access tokens instead of OIDC_TOKEN_TTL.
// Token exchange (RFC 8693, grant urn:ietf:params:oauth:grant-type:token-exchange) is open to every
// client_credentials client: subject_token and actor_token must be access tokens of this provider;
// the new token keeps the subject's sub, groups, email and extra claims, and its "act" claim names
// the actor, nesting the subject token's own "act" (the prior actors) inside: exchanging again
// builds a chain such as alice <- agent <- subagent.
// Token revocation (RFC 7009) is enabled: the device client can revoke its refresh tokens.
//
// stdout carries exactly one line, "READY http://127.0.0.1:PORT"; everything else goes to stderr.
//
// Access tokens are RS256 JWTs (typ at+jwt). For client_credentials tokens oidc-provider sets
// sub = client_id (there is no account); for device-flow tokens sub = the login name.

import {
  createPrivateKey, createPublicKey, generateKeyPairSync, randomUUID, sign, verify,
} from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints its NOTICEs with console.info, i.e. on stdout, which would break the
// one-line READY protocol.
console.log = console.info = console.error;

const port = Number(process.argv[2] ?? process.env.OIDC_PORT ?? 0);
const audience = process.env.OIDC_AUDIENCE || 'guarita';
const ttl = Number(process.env.OIDC_TOKEN_TTL || 600);
const deviceClientId = process.env.OIDC_DEVICE_CLIENT_ID || 'bastion-cli';
const deviceInterval = Number(process.env.OIDC_DEVICE_INTERVAL || 0);
const clients = JSON.parse(process.env.OIDC_CLIENTS || '[]');
const users = JSON.parse(process.env.OIDC_USERS || '[]');
const webClients = JSON.parse(process.env.OIDC_WEB_CLIENTS || '[]');
// Resource indicators must be absolute URIs while the audience we want is a bare word, so
// the default resource is a fixed URN mapped onto OIDC_AUDIENCE. Any other resource the
// test asks for becomes the audience verbatim (handy for wrong-audience tests).
const DEFAULT_RESOURCE = 'urn:guarita:default-resource';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

function loadJwks() {
  if (process.env.OIDC_JWKS_FILE) {
    const { keys } = JSON.parse(readFileSync(process.env.OIDC_JWKS_FILE, 'utf8'));
    // Tools such as PyJWT write key_ops ["sign"]; oidc-provider then fails to select the key
    // for JWT access tokens ("no corresponding key in the provider's keystore").
    return { keys: keys.map(({ key_ops: _, ...key }) => key) };
  }
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { keys: [{ ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' }] };
}

function ttlFor(client) {
  return clients.find((c) => c.client_id === client?.clientId)?.ttl ?? ttl;
}

function claimsFor(token) {
  const who = token.accountId
    ? users.find((u) => u.sub === token.accountId)
    : clients.find((c) => c.client_id === token.clientId);
  if (!who) return undefined;
  return { ...who.extra, groups: who.groups ?? [], ...(who.email ? { email: who.email } : {}) };
}

// The issuer must contain the bound port, so listen first and attach the provider afterwards.
let handler = (req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));
await new Promise((resolve, reject) => server.once('error', reject).listen(port, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const jwks = loadJwks();
const provider = new Provider(issuer, {
  jwks,
  clients: [
    ...clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials', TOKEN_EXCHANGE],
      response_types: [],
      redirect_uris: [],
    })),
    ...webClients.map((c) => ({
      client_id: c.client_id,
      token_endpoint_auth_method: 'none',  // a public client: PKCE (S256) is required
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: c.redirect_uris,
    })),
    {
      client_id: deviceClientId,
      token_endpoint_auth_method: 'none',
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  cookies: { keys: ['guarita-test-only-cookie-key'] },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => DEFAULT_RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: '',
        audience: resource === DEFAULT_RESOURCE ? audience : resource,
        accessTokenTTL: ttlFor(client),
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  // Device-flow logins accept any name; that name becomes the token's sub.
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
  extraTokenClaims: (ctx, token) => claimsFor(token),
  ttl: { AccessToken: (ctx, token, client) => ttlFor(client), ClientCredentials: (ctx, token, client) => ttlFor(client) },
});
handler = provider.callback();

// -- token exchange (RFC 8693) ------------------------------------------------------------------
const signingJwk = jwks.keys.find((k) => k.kty === 'RSA');
const signingKey = createPrivateKey({ key: signingJwk, format: 'jwk' });
const verifyKey = createPublicKey(signingKey);
const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');

function ownToken(value, what) {
  const parts = String(value ?? '').split('.');
  if (parts.length !== 3) throw new errors.InvalidGrant(`${what} is not a JWT`);
  const ok = verify('RSA-SHA256', Buffer.from(`${parts[0]}.${parts[1]}`), verifyKey, Buffer.from(parts[2], 'base64url'));
  const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
  if (!ok || claims.iss !== issuer) throw new errors.InvalidGrant(`${what} was not issued by ${issuer}`);
  if (claims.exp <= Math.floor(Date.now() / 1000)) throw new errors.InvalidGrant(`${what} has expired`);
  return claims;
}

async function tokenExchange(ctx) {
  const { params, client } = ctx.oidc;
  for (const [name, type] of [['subject_token_type', params.subject_token_type], ['actor_token_type', params.actor_token_type]]) {
    if (type && type !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest(`${name} must be ${ACCESS_TOKEN_TYPE}`);
  }
  if (!params.actor_token) throw new errors.InvalidRequest('actor_token is required (this provider only does delegation)');
  const subject = ownToken(params.subject_token, 'subject_token');
  const actor = ownToken(params.actor_token, 'actor_token');
  const now = Math.floor(Date.now() / 1000);
  const lifetime = ttlFor(client);
  const { jti: _j, iat: _i, exp: _e, nbf: _n, act: prior, client_id: _c, scope: _s, ...kept } = subject;
  // actor_issuer (this test provider only) vouches for the actor under another issuer's name:
  // what a gateway must refuse when that issuer is not one it trusts.
  const actIss = params.actor_issuer || issuer;
  const act = { sub: actor.sub, iss: actIss, ...(actor.client_id ? { client_id: actor.client_id } : {}), ...(prior ? { act: prior } : {}) };
  const payload = {
    ...kept, aud: params.audience || audience, iat: now, exp: now + Math.min(lifetime, subject.exp - now),
    jti: randomUUID(), client_id: client.clientId, act,
  };
  const header = { alg: 'RS256', typ: 'at+jwt', kid: signingJwk.kid };
  const input = `${b64(header)}.${b64(payload)}`;
  const signature = sign('RSA-SHA256', Buffer.from(input), signingKey).toString('base64url');
  ctx.body = {
    access_token: `${input}.${signature}`, issued_token_type: ACCESS_TOKEN_TYPE, token_type: 'Bearer',
    expires_in: payload.exp - now,
  };
}
provider.registerGrantType(TOKEN_EXCHANGE, tokenExchange,
  ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'audience', 'actor_issuer']);

if (deviceInterval) {
  // Emitted before the response is written: the body can still carry an interval.
  provider.on('device_authorization.success', (ctx, body) => { body.interval = deviceInterval; });
}

// Unexpected provider errors are otherwise swallowed into a generic 500 response.
provider.on('server_error', (ctx, err) => console.error('server_error', err));

function shutdown() {
  server.closeAllConnections();
  server.close(() => process.exit(0));
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

process.stdout.write(`READY ${issuer}\n`);
