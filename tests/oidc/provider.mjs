// A real OpenID Connect provider for the console's tests: npm's `oidc-provider` under node,
// configured like a company IdP that puts group memberships in a `groups` claim.
//
//   node provider.mjs CONFIG.json
//
// CONFIG: {module, port, client_id, client_secret, redirect_uris, accounts_file, audience}.
// Accounts are read from `accounts_file` on every lookup ({"alice": {"email", "name",
// "groups"}}), so a test changes someone's groups by rewriting that file, as an IdP admin
// would. Sign-in uses the package's development interactions (any password); consent is
// granted by `loadExistingGrant`, as a company IdP does for a first-party app.
//
// Access tokens for the console's admin API are JWTs: an authorization request naming a
// `resource` gets a token for it. Three resources exist:
//   the configured audience           aud = audience, 10 minutes
//   urn:extproc-test:short-lived       aud = audience, 1 second (the "expired" case)
//   urn:extproc-test:other-api         aud = urn:extproc-test:other-api (the "wrong audience")
import { readFileSync } from 'node:fs';
import { generateKeyPairSync } from 'node:crypto';
import { pathToFileURL } from 'node:url';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
// The package lives where `make oidc-provider` installed it (CONFIG.module), not beside us.
const { default: Provider } = await import(pathToFileURL(config.module).href);
const issuer = `http://127.0.0.1:${config.port}`;

function accounts() {
  return JSON.parse(readFileSync(config.accounts_file, 'utf8'));
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signing = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key-1', use: 'sig', alg: 'RS256' };

const resources = {
  [config.audience]: { audience: config.audience, ttl: 600 },
  'urn:extproc-test:short-lived': { audience: config.audience, ttl: 1 },
  'urn:extproc-test:other-api': { audience: 'urn:extproc-test:other-api', ttl: 600 },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: config.client_id,
    client_secret: config.client_secret,
    redirect_uris: config.redirect_uris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [signing] },
  pkce: { required: () => true },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups', 'admin'],
  async findAccount(ctx, id) {
    const person = accounts()[id];
    if (!person) return undefined;
    return {
      accountId: id,
      async claims() {
        const now = accounts()[id] || {};
        return {
          sub: id, email: now.email, email_verified: true, name: now.name, groups: now.groups || [],
        };
      },
    };
  },
  async extraTokenClaims(ctx, token) {
    if (!token.accountId) return undefined;
    const person = accounts()[token.accountId] || {};
    return { groups: person.groups || [], email: person.email };
  },
  async loadExistingGrant(ctx) {
    const { client, session, params } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
    let grant = grantId ? await ctx.oidc.provider.Grant.find(grantId) : undefined;
    if (!grant) {
      grant = new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
    }
    grant.addOIDCScope('openid offline_access email profile groups');
    grant.addOIDCClaims(['email', 'email_verified', 'name', 'groups']);
    for (const resource of [].concat(params.resource || [])) {
      if (resources[resource]) grant.addResourceScope(resource, 'admin');
    }
    await grant.save();
    return grant;
  },
  features: {
    devInteractions: { enabled: true },
    userinfo: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, resourceIndicator) {
        const known = resources[resourceIndicator];
        if (!known) throw new Provider.errors.InvalidTarget();
        return {
          scope: 'admin',
          audience: known.audience,
          accessTokenTTL: known.ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: {
    AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL || 600,
    AuthorizationCode: 60,
    IdToken: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    RefreshToken: 3600,
  },
  cookies: { keys: ['extproc-test-cookie-key'] },
});

provider.on('server_error', (ctx, err) => console.log(`server_error: ${err.stack}`));

const server = provider.listen(config.port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
