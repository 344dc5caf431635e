// Swagger UI on the server's own schema. A file, not an inline script: the server's CSP allows scripts from
// 'self' only, so the page works offline and no inline code runs.
"use strict";
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis],
  validatorUrl: null,  // the default badge asks a public validator: nothing leaves this machine
  layout: "BaseLayout",
});
