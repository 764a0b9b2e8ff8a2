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
// Token revocation (RFC 7009) is enabled: the device client can revoke its refresh tokens.
//
// stdout carries exactly one line, "READY http://127.0.0.1:PORT"; everything else goes to stderr.
//
// Access tokens are RS256 JWTs (typ at+jwt). For client_credentials tokens oidc-provider sets
// sub = client_id (there is no account); for device-flow tokens sub = the login name.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider from 'oidc-provider';

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

const provider = new Provider(issuer, {
  jwks: loadJwks(),
  clients: [
    ...clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
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
